//! Store URLs: how each form parses (trailing slashes, missing buckets, unknown schemes, `..`),
//! named memory stores shared within a process, and a phantom dataset read back through a real
//! S3-compatible server (moto, started by `.ci/run`) exactly as it reads from local disk.

use std::path::Path as FsPath;

use data::reference::{reference_python, reference_s3, run_reference};
use data::store::{StoreUrl, put_dir};
use data::{DataError, SynthOptions, list_cases, load_case, store_from_url};
use object_store::ObjectStore;
use object_store::path::Path;

fn prefix_of(url: &str) -> String {
    StoreUrl::parse(url)
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .prefix()
        .to_string()
}

fn invalid_reason(url: &str) -> String {
    match StoreUrl::parse(url) {
        Err(e @ DataError::InvalidUrl { .. }) => {
            let message = e.to_string();
            assert!(message.contains(url), "the error names the URL: {message}");
            message
        }
        other => panic!("{url}: expected InvalidUrl, got {other:?}"),
    }
}

#[test]
fn cloud_urls_give_bucket_and_prefix_with_or_without_trailing_slash() {
    for scheme in ["s3", "gs", "az", "azure", "abfs", "memory"] {
        for (a, b, prefix) in [
            (format!("{scheme}://b/atlas"), format!("{scheme}://b/atlas/"), "atlas"),
            (
                format!("{scheme}://b/x/AbdomenAtlas1.1"),
                format!("{scheme}://b/x/AbdomenAtlas1.1/"),
                "x/AbdomenAtlas1.1",
            ),
            (format!("{scheme}://b"), format!("{scheme}://b/"), ""),
        ] {
            assert_eq!(prefix_of(&a), prefix, "{a}");
            assert_eq!(prefix_of(&b), prefix, "{b}");
            assert_eq!(StoreUrl::parse(&a).unwrap(), StoreUrl::parse(&b).unwrap());
        }
    }
    assert_eq!(
        StoreUrl::parse("S3://my-bucket/a%20b/c").unwrap(),
        StoreUrl::S3 {
            bucket: "my-bucket".into(),
            prefix: Path::from_iter(["a b", "c"]),
        }
    );
    assert!(matches!(
        StoreUrl::parse("gs://g/p").unwrap(),
        StoreUrl::Gcs { bucket, .. } if bucket == "g"
    ));
    assert!(matches!(
        StoreUrl::parse("abfss://c@acct.dfs.core.windows.net/p").unwrap(),
        StoreUrl::Azure { authority, .. } if authority == "c@acct.dfs.core.windows.net"
    ));
    // The store opens on the bucket; the path comes back as the prefix, whichever spelling.
    for url in ["s3://bucket/atlas", "s3://bucket/atlas/", "memory://parse-test/atlas/"] {
        let (_, prefix) = store_from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(prefix.as_ref(), "atlas", "{url}");
    }
}

#[test]
fn local_forms_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("atlas");
    let file_url = url::Url::from_directory_path(&plain).unwrap().to_string();
    for url in [plain.to_str().unwrap(), file_url.as_str()] {
        assert_eq!(StoreUrl::parse(url).unwrap(), StoreUrl::Local(plain.clone()), "{url}");
        assert_eq!(data::local_dir_from_url(url).unwrap(), plain);
    }
    assert_eq!(
        StoreUrl::parse("relative/atlas").unwrap(),
        StoreUrl::Local(std::env::current_dir().unwrap().join("relative/atlas"))
    );
    // Not a scheme: `://` after a path.
    assert!(matches!(
        StoreUrl::parse("/tmp/odd://name").unwrap(),
        StoreUrl::Local(_)
    ));
    let err = data::local_dir_from_url("s3://bucket/atlas").unwrap_err().to_string();
    assert!(
        err.contains("s3://bucket/atlas") && err.contains("not a local directory"),
        "{err}"
    );
}

#[test]
fn urls_without_bucket_are_refused_by_name() {
    for (url, missing) in [
        ("s3://", "no bucket"),
        ("s3:///atlas", "no bucket"),
        ("gs:///atlas/", "no bucket"),
        ("az:///atlas", "no container"),
        ("memory://", "no store name"),
    ] {
        let reason = invalid_reason(url);
        assert!(reason.contains(missing), "{url}: {reason}");
    }
    let reason = invalid_reason("s3://KEY:SECRET@bucket/atlas");
    assert!(reason.contains("environment"), "{reason}");
}

#[test]
fn unknown_schemes_are_refused_and_the_supported_ones_listed() {
    for (url, scheme) in [
        ("ftp://host/atlas", "ftp"),
        ("https://example.com/atlas", "https"),
        ("hdfs:atlas", "hdfs"),
    ] {
        match StoreUrl::parse(url) {
            Err(e @ DataError::UnsupportedScheme { .. }) => {
                let message = e.to_string();
                assert!(message.contains(url) && message.contains(scheme), "{message}");
                assert!(message.contains("s3://") && message.contains("memory://"), "{message}");
            }
            other => panic!("{url}: expected UnsupportedScheme, got {other:?}"),
        }
    }
}

#[test]
fn dot_segments_doubled_slashes_and_queries_are_refused() {
    for url in [
        "s3://bucket/../other",
        "s3://bucket/atlas/../../x",
        "s3://bucket/atlas/./x",
        "gs://bucket/a/%2E%2E/b",
        "memory://m/a/.%2e/",
    ] {
        let reason = invalid_reason(url);
        assert!(reason.contains("segment"), "{url}: {reason}");
    }
    assert!(invalid_reason("s3://bucket/a//b").contains("doubled"));
    assert!(invalid_reason("s3://bucket/atlas?versionId=3").contains("query"));
}

#[test]
fn credentials_hint_names_the_variables() {
    // Only where this environment has none: CI exports test credentials for the S3 server.
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() && std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_none() {
        let hint = data::store::credentials_hint("s3://bucket/atlas").unwrap();
        assert!(
            hint.contains("AWS_ACCESS_KEY_ID") && hint.contains("AWS_ENDPOINT_URL"),
            "{hint}"
        );
    }
    assert_eq!(data::store::credentials_hint("memory://m/atlas"), None);
    assert_eq!(data::store::credentials_hint("/tmp/atlas"), None);
}

/// Writes `cases` small phantoms into a temp dir.
fn phantoms(cases: usize) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        cases,
        seed: 5,
        shape: [16, 16, 16],
        ..Default::default()
    };
    let ids = data::write_phantom_dataset(dir.path(), &opts).unwrap();
    (dir, ids)
}

/// Lists and loads every case through `url` and checks they equal the local copy at `local`.
async fn assert_same_as_local(url: &str, local: &FsPath, ids: &[String]) {
    let (local_store, local_root) = store_from_url(local.to_str().unwrap()).unwrap();
    let (store, root) = store_from_url(url).unwrap();
    let listed = list_cases(store.as_ref(), &root).await.unwrap();
    assert_eq!(listed, list_cases(local_store.as_ref(), &local_root).await.unwrap());
    assert_eq!(&listed, ids);
    for id in ids {
        let remote = load_case(store.as_ref(), &root, id).await.unwrap();
        let here = load_case(local_store.as_ref(), &local_root, id).await.unwrap();
        assert!(!here.foreground().is_empty(), "{id}: a phantom has organs");
        assert_eq!(remote, here, "{id} read through {url}");
    }
}

#[tokio::test]
async fn memory_stores_are_shared_by_name_within_the_process() {
    let (dir, ids) = phantoms(2);
    let (store, prefix) = store_from_url("memory://roundtrip/atlas").unwrap();
    let files = put_dir(dir.path(), store.as_ref(), &prefix).await.unwrap();
    assert_eq!(files, ids.len() * 26, "a CT and 25 masks per case");
    // A second open by name, with a trailing slash, sees what the first one wrote.
    assert_same_as_local("memory://roundtrip/atlas/", dir.path(), &ids).await;
    // Another name is another store; another prefix in the same store holds nothing.
    for url in ["memory://elsewhere/atlas", "memory://roundtrip/other"] {
        let (store, prefix) = store_from_url(url).unwrap();
        assert!(
            matches!(
                list_cases(store.as_ref(), &prefix).await,
                Err(DataError::NoCases { .. })
            ),
            "{url}"
        );
    }
}

#[tokio::test]
#[ignore = "needs the S3-compatible test server (VOXELFLEET_TEST_S3_ENDPOINT); .ci/run starts moto and runs this with --ignored"]
async fn a_dataset_in_s3_reads_like_the_local_one() {
    let s3 = reference_s3("a_dataset_in_s3_reads_like_the_local_one");
    let (dir, ids) = phantoms(3);
    let url = s3.unique_url("data-s3");
    let (store, prefix) = store_from_url(&url).unwrap();
    assert_eq!(put_dir(dir.path(), store.as_ref(), &prefix).await.unwrap(), 3 * 26);

    assert_same_as_local(&url, dir.path(), &ids).await;
    assert_same_as_local(&format!("{url}/"), dir.path(), &ids).await;

    // An absent case is reported as missing, by key, not as a store failure.
    match load_case(store.as_ref(), &prefix, "BDMAP_99999999").await {
        Err(DataError::Missing { key }) => assert!(key.ends_with("BDMAP_99999999/ct.nii.gz"), "{key}"),
        other => panic!("expected Missing, got {:?}", other.map(|c| c.id)),
    }

    // The objects are really in the server's bucket, under the prefix, byte for byte: an
    // independent client (boto3, which moto depends on) lists them.
    {
        let python = reference_python("a_dataset_in_s3_reads_like_the_local_one");
        let listing = run_reference(&python, BOTO_LIST, &[&s3.endpoint, &s3.bucket, prefix.as_ref()]);
        let mut remote: Vec<(String, u64)> = listing
            .lines()
            .map(|l| {
                let (key, size) = l.rsplit_once(' ').unwrap();
                (key.to_string(), size.parse().unwrap())
            })
            .collect();
        let mut local = local_files(dir.path(), "");
        remote.sort();
        local.sort();
        assert_eq!(remote, local);
    }
}

const BOTO_LIST: &str = r#"
import sys, boto3
endpoint, bucket, prefix = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
    for o in page.get("Contents", []):
        print(o["Key"][len(prefix) + 1:], o["Size"])
"#;

fn local_files(dir: &FsPath, rel: &str) -> Vec<(String, u64)> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = format!("{rel}{}", entry.file_name().to_str().unwrap());
        if entry.file_type().unwrap().is_dir() {
            out.extend(local_files(&entry.path(), &format!("{name}/")));
        } else {
            out.push((name, entry.metadata().unwrap().len()));
        }
    }
    out
}

/// `put` with `PutMode::Create` is what keeps two writers from overwriting one checkpoint; the
/// test server must honour it as S3 does, or tests against it would prove nothing about that.
#[tokio::test]
#[ignore = "needs the S3-compatible test server (VOXELFLEET_TEST_S3_ENDPOINT); .ci/run starts moto and runs this with --ignored"]
async fn s3_create_only_puts_refuse_to_overwrite() {
    let s3 = reference_s3("s3_create_only_puts_refuse_to_overwrite");
    let (store, prefix) = store_from_url(&s3.unique_url("create-only")).unwrap();
    let key = prefix.child("once");
    let opts = || object_store::PutOptions::from(object_store::PutMode::Create);
    store.put_opts(&key, "a".into(), opts()).await.unwrap();
    let second = store.put_opts(&key, "b".into(), opts()).await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "{second:?}"
    );
    let kept = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(&kept[..], b"a");
}
