//! Fuzzing the NIfTI reader on stable: valid files of every shape of header we read are mutated
//! (bit flips, truncation, header fields set to arbitrary values, random dims, datatypes and
//! vox_offsets, damaged gzip streams, appended junk, pure noise), driven by `arbitrary` over a
//! seeded ChaCha stream so every failing case is reproducible from its number. For each input
//! the reader must return `Ok` or `Err`, never panic, and never allocate more than the input can
//! justify: a global allocator here measures the peak of every call.
//!
//! `VOXELFLEET_FUZZ_CASES` sets the count (CI runs the default; `=100000` for a long run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use arbitrary::Unstructured;
use data::nifti_read::testing::{RawHeader, gzip};
use data::nifti_read::{MAX_VOXELS, decode};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Valid starting points: each datatype code with its bitpix, both byte orders, each transform,
/// raw and gzipped, tiny and mid-sized (so gzip damage lands inside real deflate blocks).
fn corpus() -> Vec<(RawHeader, Vec<u8>)> {
    let types: [(i16, i16); 8] = [
        (2, 8),
        (256, 8),
        (4, 16),
        (512, 16),
        (8, 32),
        (768, 32),
        (16, 32),
        (64, 64),
    ];
    let mut out = Vec::new();
    for (n, &(datatype, bitpix)) in types.iter().enumerate() {
        let dims: [i16; 3] = if n == 2 { [64, 48, 8] } else { [6, 5, 4] };
        let voxels = dims.iter().map(|&d| d as usize).product::<usize>();
        let data: Vec<u8> = (0..voxels * bitpix as usize / 8)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        let h = RawHeader {
            big_endian: n % 2 == 1,
            dim: [3, dims[0], dims[1], dims[2], 1, 1, 1, 1],
            datatype,
            bitpix,
            pixdim: [if n % 3 == 0 { -1.0 } else { 1.0 }, 0.8, 0.8, 2.5, 1.0, 1.0, 1.0, 1.0],
            scl_slope: if n % 2 == 0 { 1.5 } else { 0.0 },
            scl_inter: -3.0,
            qform_code: (n % 3) as i16,
            sform_code: (n % 2) as i16,
            quatern: [0.1, -0.2, 0.3],
            srow: [[-0.8, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, 20.0], [0.0, 0.0, 2.5, -30.0]],
            ..RawHeader::default()
        };
        out.push((h, data));
    }
    out
}

/// Offsets of header fields worth aiming at, with their widths.
const FIELDS: [(usize, usize); 16] = [
    (0, 4),
    (40, 2),
    (42, 2),
    (44, 2),
    (46, 2),
    (48, 2),
    (70, 2),
    (72, 2),
    (76, 4),
    (88, 4),
    (108, 4),
    (112, 4),
    (116, 4),
    (252, 2),
    (254, 2),
    (256, 4),
];

fn mutate(u: &mut Unstructured<'_>, corpus: &[(RawHeader, Vec<u8>)]) -> arbitrary::Result<Vec<u8>> {
    if u.ratio(1, 20)? {
        // Pure noise, sometimes dressed as gzip.
        let mut noise: Vec<u8> = u.arbitrary()?;
        if u.arbitrary()? {
            noise.splice(0..0, [0x1f, 0x8b, 8, 0]);
        }
        return Ok(noise);
    }
    let (base, data) = u.choose(corpus)?;
    let mut h = base.clone();
    // Structured header damage, before serialisation.
    for _ in 0..u.int_in_range(0..=3)? {
        match u.int_in_range(0..=7)? {
            0 => h.dim[u.int_in_range(0..=7)?] = u.arbitrary()?,
            1 => {
                let any = u.arbitrary()?;
                h.datatype = *u.choose(&[0i16, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 2304, any])?;
            }
            2 => h.bitpix = u.arbitrary()?,
            3 => {
                let any = u.arbitrary()?;
                h.vox_offset = *u.choose(&[0.0f32, 348.0, 351.0, 352.0, 352.5, 400.0, 1e9, f32::NAN, -1.0, any])?;
            }
            4 => (h.scl_slope, h.scl_inter) = (u.arbitrary()?, u.arbitrary()?),
            5 => (h.qform_code, h.sform_code) = (u.int_in_range(-2..=7)?, u.int_in_range(-2..=7)?),
            6 => {
                h.quatern = u.arbitrary()?;
                h.pixdim[u.int_in_range(0..=3)?] = u.arbitrary()?;
            }
            _ => h.srow[u.int_in_range(0..=2)?][u.int_in_range(0..=3)?] = u.arbitrary()?,
        }
    }
    let mut file = h.file(data);
    // Byte-level damage to the uncompressed file.
    for _ in 0..u.int_in_range(0..=2)? {
        match u.int_in_range(0..=2)? {
            0 => {
                let at = u.choose_index(file.len())?;
                file[at] ^= 1 << u.int_in_range(0..=7)?;
            }
            1 => {
                let &(at, width) = u.choose(&FIELDS)?;
                let value: [u8; 4] = u.arbitrary()?;
                if let Some(field) = file.get_mut(at..at + width) {
                    field.copy_from_slice(&value[..width]);
                }
            }
            _ => {
                let keep = u.int_in_range(0..=file.len())?;
                file.truncate(keep);
            }
        }
    }
    if u.arbitrary()? {
        file = gzip(&file, u.int_in_range(0..=9)?);
        // Damage to the compressed stream: flips anywhere (header, deflate blocks, CRC), cuts.
        for _ in 0..u.int_in_range(0..=2)? {
            if file.is_empty() {
                break;
            }
            if u.arbitrary()? {
                let at = u.choose_index(file.len())?;
                file[at] ^= 1 << u.int_in_range(0..=7)?;
            } else {
                let keep = u.int_in_range(0..=file.len())?;
                file.truncate(keep);
            }
        }
    }
    if u.ratio(1, 10)? {
        let junk: Vec<u8> = u.arbitrary()?;
        file.extend(junk);
    }
    Ok(file)
}

/// Decodes `input`, checking the result's consistency and the peak allocation of the call.
fn check<T: data::nifti_read::Voxel>(input: &[u8], case: u64) -> bool {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = decode::<T>(input, "fuzz.nii");
    let peak = PEAK.load(Ordering::Relaxed) - before;
    // The reserve is capped by what the input can inflate to (× 4 for u8 data widened to f32),
    // plus the 1 MiB block and the inflater's state.
    let bound = 4 * (input.len() * 1040 + (1 << 20)) + (8 << 20);
    assert!(
        peak <= bound,
        "case {case}: {peak} bytes allocated for a {}-byte input",
        input.len()
    );
    match result {
        Ok(v) => {
            assert_eq!(v.data.len(), v.shape.iter().product::<usize>(), "case {case}");
            assert!(v.data.len() as u64 <= MAX_VOXELS, "case {case}");
            assert!(v.affine.iter().flatten().all(|x| x.is_finite()), "case {case}");
            true
        }
        Err(e) => {
            assert!(
                e.to_string().contains("fuzz.nii"),
                "case {case}: error does not name the file: {e}"
            );
            false
        }
    }
}

#[test]
fn reader_never_panics_or_overallocates_on_mutated_files() {
    let cases: u64 = std::env::var("VOXELFLEET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let corpus = corpus();
    let started = std::time::Instant::now();
    let (mut ok, mut entropy) = (0u64, vec![0u8; 4096]);
    for case in 0..cases {
        ChaCha8Rng::seed_from_u64(case).fill_bytes(&mut entropy);
        let input = mutate(&mut Unstructured::new(&entropy), &corpus).unwrap_or_default();
        let decoded = std::panic::catch_unwind(|| (check::<f32>(&input, case), check::<u8>(&input, case)));
        match decoded {
            Ok((a, b)) => {
                assert_eq!(a, b, "case {case}: f32 and u8 decoding disagree on validity");
                ok += a as u64;
            }
            Err(_) => panic!(
                "case {case} panicked ({} input bytes); rerun with that seed",
                input.len()
            ),
        }
    }
    eprintln!(
        "nifti fuzz: {cases} inputs, {ok} decoded, {} refused, in {:.1} s",
        cases - ok,
        started.elapsed().as_secs_f64()
    );
    assert!(
        ok > cases / 20 && ok < cases,
        "the mutations should yield both valid and invalid files"
    );
}
