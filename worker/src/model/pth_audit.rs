//! Checks what a `.pth` file claims against what it holds, before its values are trusted.
//!
//! burn-store's reader fills whatever a tensor's storage lacks with zeros (a storage shorter than
//! the shape needs, or one missing from the archive) and reads every tensor as contiguous from its
//! offset, ignoring its strides. A truncated or altered file therefore imports "successfully" with
//! other weights. This reads the tensor records of the pickle (storage key, element type, offset,
//! shape, strides) and the sizes of the archive's storage entries, and refuses, by tensor, any
//! record the storage cannot back exactly. It reads no tensor data.
//!
//! The pickle walk lives in [`super::pth_pickle`].

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use super::pth_pickle::{TensorRef, Walker, collect};

/// Why a file was refused; `tensor` is the record's path in the pickle (`net.module.conv.weight`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuditError {
    #[error(
        "not a zip-format PyTorch checkpoint (one written before PyTorch 1.6, or a tar archive): the \
         sizes of its tensor storages cannot be checked; re-save it with a current PyTorch \
         (`torch.save(torch.load(path), new_path)`)"
    )]
    NotZip,
    #[error("{0}")]
    Archive(String),
    #[error("tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },
}

/// Checks every tensor record of the zip-format checkpoint at `path`.
pub fn audit_pth(path: &Path) -> Result<(), AuditError> {
    let file = std::fs::File::open(path).map_err(|e| AuditError::Archive(format!("cannot open it: {e}")))?;
    let mut archive = match zip::ZipArchive::new(std::io::BufReader::new(file)) {
        Ok(a) => a,
        Err(_) => return Err(AuditError::NotZip),
    };
    let (pickle, entries) = read_archive(&mut archive)?;
    let root = Walker::default().run(&pickle)?;
    let mut tensors = Vec::new();
    collect(&root, String::new(), &mut tensors);
    for (name, tensor) in tensors {
        check_tensor(&tensor, &entries).map_err(|message| AuditError::Tensor { tensor: name, message })?;
    }
    Ok(())
}

/// The pickle's bytes and the size of every storage entry, by storage key (`data/<key>`).
fn read_archive<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
) -> Result<(Vec<u8>, HashMap<String, u64>), AuditError> {
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let pickle_name = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .ok_or_else(|| AuditError::Archive("the archive holds no data.pkl".into()))?
        .clone();
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut entries = HashMap::new();
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| AuditError::Archive(format!("entry {i} of the archive: {e}")))?;
        if let Some(key) = entry.name().strip_prefix(&prefix).and_then(|n| n.strip_prefix("data/")) {
            entries.insert(key.to_string(), entry.size());
        }
    }
    let mut pickle = Vec::new();
    archive
        .by_name(&pickle_name)
        .and_then(|mut f| f.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| AuditError::Archive(format!("cannot read {pickle_name}: {e}")))?;
    Ok((pickle, entries))
}

fn element_size(type_name: &str) -> Option<u64> {
    Some(match type_name {
        "DoubleStorage" | "LongStorage" | "ComplexFloatStorage" => 8,
        "FloatStorage" | "IntStorage" => 4,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "CharStorage" | "ByteStorage" | "BoolStorage" => 1,
        "ComplexDoubleStorage" => 16,
        _ => return None,
    })
}

/// The storage must exist, be as long as its record declares, and back every element the
/// tensor's offset, shape and strides address; the strides must be contiguous (see the module
/// doc for why).
fn check_tensor(t: &TensorRef, entries: &HashMap<String, u64>) -> Result<(), String> {
    let s = &t.storage;
    let entry = format!("data/{}", s.key);
    let size = element_size(&s.type_name)
        .ok_or_else(|| format!("its storage type `{}` is not one this importer reads", s.type_name))?;
    let Some(&bytes) = entries.get(&s.key) else {
        return Err(format!(
            "its storage `{entry}` is not in the archive: the file is incomplete; copy or download it again"
        ));
    };
    let damaged = "the file is truncated or was altered; copy or download it again";
    if let Some(numel) = s.numel
        && bytes < numel.saturating_mul(size)
    {
        return Err(format!(
            "its storage `{entry}` holds {bytes} bytes, the file declares {numel} {} elements ({} bytes): {damaged}",
            s.type_name,
            numel.saturating_mul(size)
        ));
    }
    if t.shape.len() != t.stride.len() {
        return Err(format!(
            "shape {:?} with strides {:?}: a malformed record",
            t.shape, t.stride
        ));
    }
    if t.shape.contains(&0) {
        return Ok(());
    }
    let mut contiguous = 1u64;
    for (&dim, &stride) in t.shape.iter().zip(&t.stride).rev() {
        if dim > 1 && stride != contiguous {
            return Err(format!(
                "it is stored with strides {:?} for shape {:?} (not contiguous), which this importer \
                 cannot lay out: save contiguous tensors (`{{k: v.contiguous() for k, v in state_dict.items()}}`)",
                t.stride, t.shape
            ));
        }
        contiguous = contiguous.saturating_mul(dim);
    }
    let needed = t.offset.saturating_add(contiguous).saturating_mul(size);
    if bytes < needed {
        return Err(format!(
            "shape {:?} at element offset {} needs {needed} bytes of {}, its storage `{entry}` holds {bytes}: {damaged}",
            t.shape, t.offset, s.type_name
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "pth_audit_tests.rs"]
mod tests;
