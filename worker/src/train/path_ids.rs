//! Param ids as checkpoints write them: derived from each parameter's module path
//! (`blocks.0.norm.running_mean`), so checkpoint bytes are a function of the weights and the
//! optimiser state alone.
//!
//! burn's named record stores every parameter's id next to its tensor, and the optimiser state
//! is keyed by those ids. burn draws an id at random for every parameter it builds, so two
//! processes holding bit-identical weights wrote different `model.bin` and `optimizer.bin`
//! bytes. The encoders rename every id to the one its path gives, in the model record and the
//! optimiser state alike, so the pairing between the two survives. Decoders take whatever ids
//! a blob holds: blobs written with random ids (before this module) load as they always did,
//! and their next save writes path-derived ids.
//!
//! The rename works on the encoded model record rather than on the module because burn gives
//! no way to change a `RunningState`'s id (BatchNorm's statistics) short of `load_record`.

use std::collections::{HashMap, HashSet};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};
use sha2::{Digest, Sha256};

/// Every param's current id mapped to the id its module path gives.
pub(crate) type Renames = HashMap<ParamId, ParamId>;

/// The id a checkpoint writes for the param at `path` (dot-joined field names and indices): the
/// first 8 bytes of its SHA-256, the width of burn's ids.
pub(crate) fn id_for_path(path: &str) -> ParamId {
    let digest = Sha256::digest(path.as_bytes());
    ParamId::from(u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")))
}

/// Maps every param of `model` (float, int and bool, buffers included) to its path-derived id.
/// Refuses a model whose params share an id or whose paths collide, which a rename would
/// silently merge.
pub(crate) fn renames<B: Backend, M: Module<B>>(model: &M) -> Result<Renames, String> {
    struct Paths {
        path: Vec<String>,
        seen: Vec<(ParamId, String)>,
    }
    impl Paths {
        fn note(&mut self, id: ParamId) {
            self.seen.push((id, self.path.join(".")));
        }
    }
    impl<B: Backend> ModuleVisitor<B> for Paths {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.note(param.id);
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
            self.note(param.id);
        }
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
            self.note(param.id);
        }
    }
    let mut paths = Paths {
        path: vec![],
        seen: vec![],
    };
    model.visit(&mut paths);
    let mut renames = Renames::with_capacity(paths.seen.len());
    let mut targets = HashSet::with_capacity(paths.seen.len());
    for (id, path) in paths.seen {
        let target = id_for_path(&path);
        if renames.insert(id, target).is_some() || !targets.insert(target) {
            return Err(format!("two params share the id or path of `{path}`"));
        }
    }
    Ok(renames)
}

/// How burn's named MessagePack record writes a param: a two-entry map (`0x82`) whose first key
/// is the fixstr `"id"` (`0xa2 i d`), then the id as a 13-character fixstr (`0xad`).
const ID_FIELD: [u8; 5] = [0x82, 0xa2, b'i', b'd', 0xad];
/// `ParamId::serialize` is the base32 of 8 bytes: always 13 characters.
const ID_CHARS: usize = 13;

/// Rewrites, in place, every param id of an encoded module record (`NamedMpkBytesRecorder`'s
/// output) to its renamed one. The record holds each param exactly once; anything else (an id
/// missing, or found twice) is an error, so a change in burn's encoding fails loudly instead of
/// writing random ids again. Each id is a 64-bit random string preceded by its field's key, so
/// tensor bytes cannot pass for one.
pub(crate) fn rename_in_record(record: &mut [u8], renames: &Renames) -> Result<(), String> {
    let by_text: HashMap<Vec<u8>, [u8; ID_CHARS]> = renames
        .iter()
        .map(|(from, to)| (from.serialize().into_bytes(), fixed_width(*to)))
        .collect();
    let mut renamed: HashSet<&[u8]> = HashSet::with_capacity(by_text.len());
    let mut at = 0;
    while let Some(found) = find(&record[at..], &ID_FIELD) {
        let start = at + found + ID_FIELD.len();
        at = start;
        let Some(text) = record.get(start..start + ID_CHARS) else {
            break;
        };
        let Some((key, to)) = by_text.get_key_value(text) else {
            continue;
        };
        if !renamed.insert(key.as_slice()) {
            return Err(format!(
                "param id {} appears twice in the record",
                String::from_utf8_lossy(key)
            ));
        }
        record[start..start + ID_CHARS].copy_from_slice(to);
        at = start + ID_CHARS;
    }
    if renamed.len() != by_text.len() {
        return Err(format!(
            "found {} of the model's {} param ids in its encoded record",
            renamed.len(),
            by_text.len()
        ));
    }
    Ok(())
}

fn fixed_width(id: ParamId) -> [u8; ID_CHARS] {
    id.serialize()
        .into_bytes()
        .try_into()
        .expect("a ParamId serialises to 13 characters")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::model::test_unet;
    use burn::module::list_param_ids;

    #[test]
    fn every_param_gets_the_id_of_its_own_path() {
        let device = Default::default();
        let model = test_unet(2, 4, 2).init::<Cpu>(&device);
        let first = renames::<Cpu, _>(&model).unwrap();
        let ids = list_param_ids::<_, Cpu>(&model);
        assert_eq!(first.len(), ids.len());
        assert!(ids.iter().all(|id| first.contains_key(id)));
        // Another build of the same architecture maps to the same targets.
        let again = renames::<Cpu, _>(&test_unet(2, 4, 2).init::<Cpu>(&device)).unwrap();
        let targets = |r: &Renames| r.values().copied().collect::<HashSet<_>>();
        assert_eq!(targets(&first), targets(&again));
        assert_ne!(id_for_path("a.weight"), id_for_path("a.bias"));
    }

    #[test]
    fn a_record_missing_an_id_is_refused() {
        let model = test_unet(2, 4, 2).init::<Cpu>(&Default::default());
        let renames = renames::<Cpu, _>(&model).unwrap();
        let err = rename_in_record(&mut b"not a record".to_vec(), &renames).unwrap_err();
        assert!(
            err.contains(&format!("found 0 of the model's {} param ids", renames.len())),
            "{err}"
        );
    }
}
