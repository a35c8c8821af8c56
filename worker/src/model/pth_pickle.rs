//! The pickle walk behind [`super::pth_audit`]: finds every tensor record of a `torch.save`
//! pickle (storage key, element type, offset, shape, strides) without reading tensor data.
//!
//! It models only what `torch.save` writes for tensors and containers; every other object is kept
//! as an opaque node whose parts are still searched for tensors. burn-store's own pickle reader
//! hides these records inside closures that pad short storage with zeros, hence this one.

use std::collections::HashMap;
use std::rc::Rc;

use super::pth_audit::AuditError;

/// `('storage', <type>, key, location, numel)`, as `torch.save` writes a storage reference.
#[derive(Debug)]
pub(super) struct StorageRef {
    pub(super) type_name: String,
    pub(super) key: String,
    pub(super) numel: Option<u64>,
}

/// The arguments of `torch._utils._rebuild_tensor_v2`.
#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<StorageRef>,
    pub(super) offset: u64,
    pub(super) shape: Vec<u64>,
    pub(super) stride: Vec<u64>,
}

/// What the walk keeps of a pickled value.
#[derive(Debug, Clone)]
pub(super) enum Value {
    Mark,
    Int(i64),
    Str(String),
    Global(String, String),
    /// Tuples and lists.
    Seq(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// Any other object, with the parts it was built from.
    Object(Vec<Value>),
    /// A leaf nothing here needs (None, bools, floats, bytes).
    Leaf,
}

/// The tensors under `value`, each with its path of dict keys and sequence indices.
pub(super) fn collect(value: &Value, path: String, out: &mut Vec<(String, Rc<TensorRef>)>) {
    let join = |part: &str| {
        if path.is_empty() {
            part.to_string()
        } else {
            format!("{path}.{part}")
        }
    };
    match value {
        Value::Tensor(t) => out.push((if path.is_empty() { "<root>".into() } else { path }, t.clone())),
        Value::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => "?".into(),
                };
                collect(v, join(&key), out);
            }
        }
        Value::Seq(items) | Value::Object(items) => {
            for (i, v) in items.iter().enumerate() {
                collect(v, join(&i.to_string()), out);
            }
        }
        _ => {}
    }
}

/// A pickle virtual machine reduced to what finding tensor records needs.
#[derive(Default)]
pub(super) struct Walker {
    stack: Vec<Value>,
    memo: HashMap<u64, Value>,
}

struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(format!("ends inside an argument at byte {}", self.at));
        };
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64, String> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("unterminated line at byte {}", self.at))?;
        let line = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.at += len + 1;
        Ok(line)
    }

    fn string(&mut self, len: u64) -> Result<String, String> {
        let len = usize::try_from(len).map_err(|_| "a string longer than memory".to_string())?;
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }
}

impl Walker {
    pub(super) fn run(mut self, data: &[u8]) -> Result<Value, AuditError> {
        let mut input = Input { data, at: 0 };
        loop {
            let at = input.at;
            let op = input
                .u8()
                .map_err(|_| AuditError::Archive("data.pkl ends before its STOP opcode".into()))?;
            match self.step(op, &mut input) {
                Ok(true) => {}
                Ok(false) => return self.pop().map_err(|e| AuditError::Archive(format!("data.pkl: {e}"))),
                Err(e) => {
                    return Err(AuditError::Archive(format!(
                        "data.pkl: opcode 0x{op:02x} at byte {at}: {e}"
                    )));
                }
            }
        }
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack.pop().ok_or_else(|| "pops an empty stack".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| "no MARK on the stack".to_string())?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack.last_mut().ok_or_else(|| "empty stack".to_string())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let value = self.top()?.clone();
        self.memo.insert(key, value);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let value = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("memo {key} unset"))?;
        self.stack.push(value);
        Ok(())
    }

    /// Runs one opcode; `false` at STOP.
    fn step(&mut self, op: u8, input: &mut Input<'_>) -> Result<bool, String> {
        match op {
            b'.' => return Ok(false),
            0x80 => {
                input.u8()?; // PROTO
            }
            0x95 => {
                input.take(8)?; // FRAME
            }
            b'(' => self.stack.push(Value::Mark),
            b')' => self.stack.push(Value::Seq(vec![])),
            b']' => self.stack.push(Value::Seq(vec![])),
            b'}' => self.stack.push(Value::Dict(vec![])),
            0x8f => self.stack.push(Value::Object(vec![])), // EMPTY_SET
            b't' | b'l' | 0x91 => {
                // TUPLE, LIST, FROZENSET
                let items = self.pop_mark()?;
                self.stack.push(if op == 0x91 {
                    Value::Object(items)
                } else {
                    Value::Seq(items)
                });
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err("TUPLEn on a short stack".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Seq(items));
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Dict(pairs(items)?));
            }
            b'a' => {
                let item = self.pop()?;
                extend(self.top()?, vec![item]);
            }
            b'e' | 0x90 => {
                // APPENDS, ADDITEMS
                let items = self.pop_mark()?;
                extend(self.top()?, items);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                set_items(self.top()?, vec![(k, v)]);
            }
            b'u' => {
                let items = pairs(self.pop_mark()?)?;
                set_items(self.top()?, items);
            }
            b'N' | 0x88 | 0x89 => self.stack.push(Value::Leaf),
            b'J' => self.stack.push(Value::Int(input.le(4)? as u32 as i32 as i64)),
            b'K' => self.stack.push(Value::Int(input.le(1)? as i64)),
            b'M' => self.stack.push(Value::Int(input.le(2)? as i64)),
            0x8a | 0x8b => {
                let n = if op == 0x8a { input.le(1)? } else { input.le(4)? };
                let bytes = input.take(usize::try_from(n).map_err(|e| e.to_string())?)?;
                self.stack.push(long(bytes));
            }
            b'I' | b'L' => {
                let line = input.line()?;
                let text = line.trim_end_matches('L');
                self.stack.push(match text {
                    "00" | "01" => Value::Leaf, // protocol 0 booleans
                    _ => Value::Int(text.parse().map_err(|_| format!("bad integer `{line}`"))?),
                });
            }
            b'F' => {
                input.line()?;
            }
            b'G' => {
                input.take(8)?;
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => input.le(4)?,
                    0x8c => input.le(1)?,
                    _ => input.le(8)?,
                };
                let s = input.string(n)?;
                self.stack.push(Value::Str(s));
            }
            b'V' | b'S' => {
                let line = input.line()?;
                let s = if op == b'S' {
                    line.trim_matches(|c| c == '\'' || c == '"').to_string()
                } else {
                    line
                };
                self.stack.push(Value::Str(s));
            }
            b'T' | b'U' => {
                let n = if op == b'T' { input.le(4)? } else { input.le(1)? };
                let s = input.string(n)?;
                self.stack.push(Value::Str(s));
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => input.le(4)?,
                    b'C' => input.le(1)?,
                    _ => input.le(8)?,
                };
                input.take(usize::try_from(n).map_err(|e| e.to_string())?)?;
                self.stack.push(Value::Leaf);
            }
            b'c' => {
                let module = input.line()?;
                let name = input.line()?;
                self.stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err("STACK_GLOBAL of non-strings".into());
                };
                self.stack.push(Value::Global(module, name));
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let value = reduce(callable, args)?;
                self.stack.push(value);
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.pop()?;
                self.stack.push(match obj {
                    // An OrderedDict's state is its `_metadata`: no tensors.
                    Value::Dict(_) => obj,
                    obj => Value::Object(vec![obj, state]),
                });
            }
            0x81 => {
                let args = self.pop()?;
                let _class = self.pop()?;
                self.stack.push(Value::Object(vec![args]));
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let _class = self.pop()?;
                self.stack.push(Value::Object(vec![args, kwargs]));
            }
            b'i' => {
                input.line()?;
                input.line()?;
                let items = self.pop_mark()?;
                self.stack.push(Value::Object(items));
            }
            b'o' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Object(items));
            }
            b'Q' => {
                let pid = self.pop()?;
                self.stack.push(storage(pid)?);
            }
            b'P' => {
                input.line()?;
                self.stack.push(Value::Leaf);
            }
            b'q' => self.memo_put(input.le(1)?)?,
            b'r' => self.memo_put(input.le(4)?)?,
            b'p' => {
                let key = input.line()?.parse().map_err(|_| "bad PUT index".to_string())?;
                self.memo_put(key)?;
            }
            0x94 => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?;
            }
            b'h' => self.memo_get(input.le(1)?)?,
            b'j' => self.memo_get(input.le(4)?)?,
            b'g' => {
                let key = input.line()?.parse().map_err(|_| "bad GET index".to_string())?;
                self.memo_get(key)?;
            }
            b'0' => drop(self.pop()?),
            b'1' => drop(self.pop_mark()?),
            b'2' => {
                let top = self.top()?.clone();
                self.stack.push(top);
            }
            0x82..=0x84 => {
                input.take(1 << (op - 0x82))?;
                self.stack.push(Value::Leaf);
            }
            _ => return Err("not an opcode torch.save writes".into()),
        }
        Ok(true)
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("an odd number of dict items".into());
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn extend(target: &mut Value, items: Vec<Value>) {
    match target {
        Value::Seq(v) | Value::Object(v) => v.extend(items),
        other => *other = Value::Object(std::iter::once(other.clone()).chain(items).collect()),
    }
}

fn set_items(target: &mut Value, items: Vec<(Value, Value)>) {
    match target {
        Value::Dict(d) => d.extend(items),
        Value::Object(v) => v.push(Value::Dict(items)),
        other => *other = Value::Object(vec![other.clone(), Value::Dict(items)]),
    }
}

/// LONG1/LONG4: little-endian two's complement; only small values matter here.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::Leaf;
    }
    let mut v: i64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        v |= (b as i64) << (8 * i);
    }
    if let Some(&last) = bytes.last()
        && last & 0x80 != 0
        && bytes.len() < 8
    {
        v -= 1i64 << (8 * bytes.len());
    }
    Value::Int(v)
}

fn storage(pid: Value) -> Result<Value, String> {
    let Value::Seq(parts) = pid else {
        return Ok(Value::Leaf);
    };
    match parts.as_slice() {
        [Value::Str(tag), kind, Value::Str(key), _location, rest @ ..] if tag == "storage" => {
            let type_name = match kind {
                Value::Global(_, name) | Value::Str(name) => name.clone(),
                _ => return Err("a storage reference without a type".into()),
            };
            let numel = match rest.first() {
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => None,
            };
            Ok(Value::Storage(Rc::new(StorageRef {
                type_name,
                key: key.clone(),
                numel,
            })))
        }
        _ => Ok(Value::Leaf),
    }
}

fn ints(value: &Value) -> Option<Vec<u64>> {
    match value {
        Value::Seq(items) => items
            .iter()
            .map(|v| match v {
                Value::Int(i) => u64::try_from(*i).ok(),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = &callable else {
        return Ok(Value::Object(vec![args]));
    };
    let arg_list = match &args {
        Value::Seq(items) => items.as_slice(),
        _ => &[],
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => match arg_list {
            [Value::Storage(storage), Value::Int(offset), shape, stride, ..] => {
                let (Some(shape), Some(stride)) = (ints(shape), ints(stride)) else {
                    return Err(format!("{name}: a shape or stride that is not a tuple of sizes"));
                };
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset: u64::try_from(*offset).map_err(|_| format!("{name}: a negative offset"))?,
                    shape,
                    stride,
                })))
            }
            _ => Err(format!(
                "{name}: arguments are not (storage, offset, shape, stride, ...)"
            )),
        },
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Ok(arg_list.first().cloned().unwrap_or(Value::Leaf))
        }
        ("torch._tensor", "_rebuild_from_type_v2") => match arg_list {
            [func, _type, func_args, ..] => reduce(func.clone(), func_args.clone()),
            _ => Err("_rebuild_from_type_v2: too few arguments".into()),
        },
        ("collections", "OrderedDict") => Ok(Value::Dict(match arg_list.first() {
            Some(Value::Seq(items)) => items
                .iter()
                .filter_map(|pair| match pair {
                    Value::Seq(kv) if kv.len() == 2 => Some((kv[0].clone(), kv[1].clone())),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        })),
        _ => Ok(Value::Object(vec![args])),
    }
}
