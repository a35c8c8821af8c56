//! Copies of a real torch-written fixture with one thing changed (a storage cut short or left
//! out, a stride, an offset, NaN weights): each must be refused by name, where burn-store alone
//! reads them without complaint.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use burn_store::pytorch::PytorchReader;

use super::*;
use crate::backend::Cpu;
use crate::model::ModelConfig;
use crate::model::interop::{InteropError, TorchStateDict, load_torch_state_dict};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/unet_tiny.pth");
/// The fixture's first tensor: 4x1x3x3x3 fp16 in `unet_tiny/data/0` (216 bytes), under `net`.
const FIRST: &str = "net.module.backbone.down_tr64.ops.0.conv1.weight";

/// A copy of the fixture with every entry passed through `edit(name, bytes)`: new bytes, or `None`
/// to leave the entry out.
fn rewrite(dir: &Path, file: &str, edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) -> PathBuf {
    let out = dir.join(file);
    let mut src = zip::ZipArchive::new(std::fs::File::open(FIXTURE).unwrap()).unwrap();
    let mut dst = zip::ZipWriter::new(std::fs::File::create(&out).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..src.len() {
        let mut entry = src.by_index(i).unwrap();
        let name = entry.name().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if let Some(bytes) = edit(&name, bytes) {
            dst.start_file(name, options).unwrap();
            dst.write_all(&bytes).unwrap();
        }
    }
    dst.finish().unwrap();
    out
}

/// `bytes` with the first occurrence of `from` replaced by `to` (same length).
fn patch(bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in data.pkl");
    let mut out = bytes;
    out[at..at + to.len()].copy_from_slice(to);
    out
}

fn refusal(path: &Path) -> String {
    match TorchStateDict::read_pth(path) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => {
            assert!(matches!(e, InteropError::Audit { .. }), "{e}");
            e.to_string()
        }
    }
}

#[test]
fn the_fixture_and_a_faithful_copy_pass() {
    audit_pth(Path::new(FIXTURE)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let copy = rewrite(tmp.path(), "copy.pth", |_, bytes| Some(bytes));
    assert_eq!(TorchStateDict::read_pth(&copy).unwrap().len(), 106);
}

#[test]
fn a_storage_holding_half_the_bytes_its_shape_needs_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let short = rewrite(tmp.path(), "short.pth", |name, mut bytes| {
        if name == "unet_tiny/data/0" {
            bytes.truncate(bytes.len() / 2);
        }
        Some(bytes)
    });
    // burn-store reads it, the missing half as zeros: the hole this closes.
    let reader = PytorchReader::with_top_level_key(&short, "net").unwrap();
    let data = reader
        .get("module.backbone.down_tr64.ops.0.conv1.weight")
        .unwrap()
        .to_data()
        .unwrap()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(data.len(), 108);
    assert!(data[54..].iter().all(|v| *v == 0.0));

    let err = refusal(&short);
    assert!(
        err.contains("short.pth") && err.contains(FIRST) && err.contains("holds 108 bytes") && err.contains("216"),
        "{err}"
    );
}

#[test]
fn a_storage_missing_from_the_archive_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = rewrite(tmp.path(), "missing.pth", |name, bytes| {
        (name != "unet_tiny/data/1").then_some(bytes)
    });
    let err = refusal(&missing);
    assert!(
        err.contains("net.module.backbone.down_tr64.ops.0.conv1.bias") && err.contains("not in the archive"),
        "{err}"
    );
}

#[test]
fn a_view_past_the_end_of_its_storage_is_refused() {
    // The first record's offset 0 becomes 1: the storage is whole, the tensor runs past its end.
    let tmp = tempfile::tempdir().unwrap();
    let shifted = rewrite(tmp.path(), "shifted.pth", |name, bytes| {
        Some(if name.ends_with("data.pkl") {
            patch(bytes, b"QK\x00(K\x04K\x01K\x03", b"QK\x01(K\x04K\x01K\x03")
        } else {
            bytes
        })
    });
    let err = refusal(&shifted);
    assert!(
        err.contains(FIRST) && err.contains("offset 1 needs 218 bytes") && err.contains("holds 216"),
        "{err}"
    );
}

#[test]
fn strides_that_are_not_contiguous_are_refused() {
    // burn-store ignores strides, so a transposed view would load permuted.
    let tmp = tempfile::tempdir().unwrap();
    let strided = rewrite(tmp.path(), "strided.pth", |name, bytes| {
        Some(if name.ends_with("data.pkl") {
            patch(bytes, b"K\x1bK\x1bK\tK\x03K\x01t", b"K\x1bK\x1bK\tK\x01K\x03t")
        } else {
            bytes
        })
    });
    let err = refusal(&strided);
    assert!(err.contains(FIRST) && err.contains("not contiguous"), "{err}");
}

#[test]
fn a_file_that_is_not_a_zip_is_refused_with_the_remedy() {
    let tmp = tempfile::tempdir().unwrap();
    let legacy = tmp.path().join("legacy.pth");
    std::fs::write(&legacy, b"\x80\x02}q\x00.").unwrap();
    let err = audit_pth(&legacy).unwrap_err();
    assert_eq!(err, AuditError::NotZip);
    assert!(err.to_string().contains("torch.save"), "{err}");
}

#[test]
fn non_finite_weights_are_refused_at_import_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let nan = rewrite(tmp.path(), "nan.pth", |name, bytes| {
        Some(if name == "unet_tiny/data/0" {
            // fp16 NaN, little-endian, in all 108 values.
            bytes.chunks(2).flat_map(|_| [0x00, 0x7e]).collect()
        } else {
            bytes
        })
    });
    let dict = TorchStateDict::read_pth(&nan).unwrap();
    let config = ModelConfig::Unet(crate::model::unet::tiny().with_out_channels(3));
    let err = load_torch_state_dict(config.init::<Cpu>(&Default::default()), &config, &dict).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            InteropError::NonFinite {
                count: 108,
                total: 108,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("nan.pth") && text.contains("`down_tr64.ops.0.conv1.weight`"),
        "{text}"
    );
    // The untouched fixture loads.
    let dict = TorchStateDict::read_pth(Path::new(FIXTURE)).unwrap();
    load_torch_state_dict(config.init::<Cpu>(&Default::default()), &config, &dict).unwrap();
}

/// The opcodes newer protocols use (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL), which the
/// protocol-2 fixture does not.
#[test]
fn protocol_4_records_are_read() {
    let mut p: Vec<u8> = vec![0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0, b'}', 0x94];
    let s = |p: &mut Vec<u8>, text: &str| {
        p.push(0x8c);
        p.push(text.len() as u8);
        p.extend_from_slice(text.as_bytes());
    };
    s(&mut p, "w");
    s(&mut p, "torch._utils");
    s(&mut p, "_rebuild_tensor_v2");
    p.extend_from_slice(&[0x93, 0x94, b'(', b'(']);
    s(&mut p, "storage");
    s(&mut p, "torch");
    s(&mut p, "FloatStorage");
    p.push(0x93);
    s(&mut p, "0");
    s(&mut p, "cpu");
    p.extend_from_slice(&[b'K', 6, b't', b'Q', b'K', 0]);
    p.extend_from_slice(&[
        b'K', 2, b'K', 3, 0x86, b'K', 3, b'K', 1, 0x86, 0x89, b'}', b't', b'R', b's', b'.',
    ]);
    let root = Walker::default().run(&p).unwrap();
    let mut found = Vec::new();
    collect(&root, String::new(), &mut found);
    assert_eq!(found.len(), 1);
    let (name, t) = &found[0];
    assert_eq!(name, "w");
    assert_eq!(
        (t.storage.type_name.as_str(), t.storage.key.as_str()),
        ("FloatStorage", "0")
    );
    assert_eq!((t.storage.numel, t.offset), (Some(6), 0));
    assert_eq!((t.shape.as_slice(), t.stride.as_slice()), (&[2, 3][..], &[3, 1][..]));
    let entries = |bytes: u64| HashMap::from([("0".to_string(), bytes)]);
    check_tensor(t, &entries(24)).unwrap();
    let err = check_tensor(t, &entries(20)).unwrap_err();
    assert!(err.contains("holds 20 bytes"), "{err}");
}
