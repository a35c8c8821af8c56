use super::testing::{RawHeader, gzip};
use super::*;

fn i16_bytes(values: &[i16], big: bool) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| if big { v.to_be_bytes() } else { v.to_le_bytes() })
        .collect()
}

fn header_2x3x4(big: bool) -> RawHeader {
    RawHeader {
        big_endian: big,
        dim: [3, 4, 3, 2, 1, 1, 1, 1],
        pixdim: [1.0, 0.8, 0.9, 2.5, 1.0, 1.0, 1.0, 1.0],
        ..RawHeader::default()
    }
}

fn reason(err: DataError) -> String {
    match err {
        DataError::Corrupt { key, reason } => {
            assert_eq!(key, "k.nii");
            reason
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn both_byte_orders_decode_to_the_same_z_y_x_volume() {
    let values: Vec<i16> = (0..24).map(|v| v * 100 - 1000).collect();
    for big in [false, true] {
        let file = header_2x3x4(big).file(&i16_bytes(&values, big));
        let image = decode_image::<f32>(&file, "k.nii").expect("decodes");
        assert_eq!(
            image.header.endianness,
            if big { Endianness::Big } else { Endianness::Little }
        );
        assert_eq!(image.volume.shape, [2, 3, 4]);
        let expected: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        assert_eq!(image.volume.data, expected);
        let gz = decode::<f32>(&gzip(&file, 6), "k.nii").expect("gzip decodes");
        assert_eq!(gz.data, expected);
    }
}

#[test]
fn scaling_follows_nibabels_get_slope_inter() {
    let values = [-3i16, 0, 7];
    let mut h = RawHeader {
        dim: [3, 3, 1, 1, 1, 1, 1, 1],
        scl_slope: 0.5,
        scl_inter: -10.0,
        ..RawHeader::default()
    };
    let scaled = decode::<f32>(&h.file(&i16_bytes(&values, false)), "k.nii").expect("scaled");
    assert_eq!(scaled.data, vec![-11.5, -10.0, -6.5]);
    let mask = decode::<u8>(&h.file(&i16_bytes(&[20, 0, 7], false)), "k.nii").expect("mask");
    assert_eq!(mask.data, vec![0, 1, 1], "20 * 0.5 - 10 == 0 is background");
    for unscaled in [0.0, f32::NAN, f32::INFINITY] {
        h.scl_slope = unscaled;
        let v = decode::<f32>(&h.file(&i16_bytes(&values, false)), "k.nii").expect("unscaled");
        assert_eq!(v.data, vec![-3.0, 0.0, 7.0], "slope {unscaled} means unscaled");
    }
    h.scl_slope = 2.0;
    h.scl_inter = f32::NAN;
    let r = reason(decode::<f32>(&h.file(&i16_bytes(&values, false)), "k.nii").unwrap_err());
    assert!(r.contains("scl_inter"), "{r}");
}

#[test]
fn base_affine_flips_x_and_centres_the_volume() {
    let h = header_2x3x4(false);
    let image = decode_image::<f32>(&h.file(&[0; 48]), "k.nii").expect("decodes");
    assert_eq!(image.affine_source, AffineSource::Base);
    let a = image.volume.affine;
    assert_eq!([a[0][0], a[1][1], a[2][2]], [-0.8f32 as f64, 0.9f32 as f64, 2.5]);
    assert_eq!(a[0][3], 1.5 * 0.8f32 as f64);
    assert_eq!(a[2][3], -0.5 * 2.5);
}

#[test]
fn qform_rotates_by_the_quaternion_and_flips_z_by_qfac() {
    // 90° about z: (b, c, d) = (0, 0, sin 45°), w = cos 45°.
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let mut h = header_2x3x4(false);
    h.pixdim[0] = -1.0;
    h.qform_code = 1;
    h.quatern = [0.0, 0.0, s];
    h.qoffset = [10.0, 20.0, 30.0];
    let a = decode::<f32>(&h.file(&[0; 48]), "k.nii").expect("decodes").affine;
    let (dx, dy, dz) = (0.8f32 as f64, 0.9f32 as f64, 2.5);
    let expected = [
        [0.0, -dy, 0.0, 10.0],
        [dx, 0.0, 0.0, 20.0],
        [0.0, 0.0, -dz, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for (row, exp) in a.iter().zip(&expected) {
        for (v, e) in row.iter().zip(exp) {
            assert!((v - e).abs() < 1e-6, "{a:?} vs {expected:?}");
        }
    }
    // The sform wins when both are set; an out-of-range sform code is ignored, as nibabel does.
    h.srow = [[2.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 2.0], [0.0, 0.0, 4.0, 3.0]];
    h.sform_code = 2;
    let image = decode_image::<f32>(&h.file(&[0; 48]), "k.nii").expect("decodes");
    assert_eq!(image.affine_source, AffineSource::Sform);
    assert_eq!(image.volume.affine[1], [0.0, 3.0, 0.0, 2.0]);
    h.sform_code = 9;
    let image = decode_image::<f32>(&h.file(&[0; 48]), "k.nii").expect("decodes");
    assert_eq!(image.affine_source, AffineSource::Qform);
    // (b, c, d) longer than a unit quaternion allows.
    h.quatern = [0.9, 0.9, 0.0];
    assert!(reason(decode::<f32>(&h.file(&[0; 48]), "k.nii").unwrap_err()).contains("quatern"));
}

#[test]
fn malformed_headers_are_refused_by_field() {
    let ok = header_2x3x4(false);
    let cases: Vec<(&str, RawHeader, usize)> = vec![
        (
            "bitpix",
            RawHeader {
                bitpix: 8,
                ..ok.clone()
            },
            48,
        ),
        (
            "complex64",
            RawHeader {
                datatype: 32,
                bitpix: 64,
                ..ok.clone()
            },
            192,
        ),
        (
            "datatype code 3",
            RawHeader {
                datatype: 3,
                ..ok.clone()
            },
            48,
        ),
        (
            "dim[2] is 0",
            RawHeader {
                dim: [3, 4, 0, 2, 1, 1, 1, 1],
                ..ok.clone()
            },
            48,
        ),
        (
            "dim[1] is -4",
            RawHeader {
                dim: [3, -4, 3, 2, 1, 1, 1, 1],
                ..ok.clone()
            },
            48,
        ),
        (
            "dim[4] is 2",
            RawHeader {
                dim: [4, 4, 3, 2, 2, 1, 1, 1],
                ..ok.clone()
            },
            96,
        ),
        (
            "dim[0] is 2",
            RawHeader {
                dim: [2, 4, 3, 2, 1, 1, 1, 1],
                ..ok.clone()
            },
            48,
        ),
        (
            "over the limit",
            RawHeader {
                dim: [3, 32767, 32767, 32767, 1, 1, 1, 1],
                ..ok.clone()
            },
            48,
        ),
        (
            "vox_offset 0",
            RawHeader {
                vox_offset: 0.0,
                ..ok.clone()
            },
            48,
        ),
        (
            "vox_offset is NaN",
            RawHeader {
                vox_offset: f32::NAN,
                ..ok.clone()
            },
            48,
        ),
        (
            "magic",
            RawHeader {
                magic: *b"ni1\0",
                ..ok.clone()
            },
            48,
        ),
        (
            "sizeof_hdr 540",
            RawHeader {
                sizeof_hdr: 540,
                ..ok.clone()
            },
            48,
        ),
        ("data ends after 47 of the 48 bytes", ok.clone(), 47),
        (
            "pixdim[3]",
            RawHeader {
                pixdim: [1.0, 1.0, 1.0, f32::INFINITY, 1.0, 1.0, 1.0, 1.0],
                ..ok.clone()
            },
            48,
        ),
    ];
    for (needle, header, data_len) in cases {
        let file = header.file(&vec![0u8; data_len]);
        let r = reason(decode::<f32>(&file, "k.nii").unwrap_err());
        assert!(r.contains(needle), "expected {needle:?} in {r:?}");
    }
    let r = reason(decode::<f32>(&ok.file(&[0; 48])[..200], "k.nii").unwrap_err());
    assert!(r.contains("inside the 348-byte header"), "{r}");
    // A 4th dim of 1 is a 3-D volume.
    let h = RawHeader {
        dim: [4, 4, 3, 2, 1, 1, 1, 1],
        ..ok.clone()
    };
    assert_eq!(
        decode::<f32>(&h.file(&[0; 48]), "k.nii").expect("4-D of 1").shape,
        [2, 3, 4]
    );
}

#[test]
fn damaged_gzip_is_refused() {
    let values: Vec<i16> = (0..24).collect();
    let gz = gzip(&header_2x3x4(false).file(&i16_bytes(&values, false)), 6);
    let r = reason(decode::<f32>(&gz[..gz.len() / 2], "k.nii").unwrap_err());
    assert!(r.contains("gzip") || r.contains("ends"), "{r}");
    let mut crc = gz.clone();
    let n = crc.len();
    crc[n - 6] ^= 0xff; // the CRC32 in the trailer
    let r = reason(decode::<f32>(&crc, "k.nii").unwrap_err());
    assert!(r.contains("gzip"), "{r}");
}

#[tokio::test]
async fn fetch_streams_the_object_into_the_same_volume() {
    use object_store::ObjectStore;
    use object_store::memory::InMemory;
    let values: Vec<i16> = (0..24).map(|v| v * 3).collect();
    let file = gzip(&header_2x3x4(true).file(&i16_bytes(&values, true)), 1);
    let store = InMemory::new();
    let key = object_store::path::Path::from("BDMAP_1/ct.nii.gz");
    store.put(&key, file.clone().into()).await.expect("put");
    let fetched = fetch_volume::<f32>(&store, &key).await.expect("fetch");
    assert_eq!(fetched, decode::<f32>(&file, "k.nii").expect("decode"));
    let missing = object_store::path::Path::from("BDMAP_2/ct.nii.gz");
    assert!(matches!(
        fetch_volume::<u8>(&store, &missing).await,
        Err(DataError::Missing { .. })
    ));
}
