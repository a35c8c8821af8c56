//! Dataset and artifact URLs, opened as `object_store` stores. One place decides what a URL means,
//! so the coordinator (listing, verifying checkpoints) and the workers (reading cases, writing
//! checkpoints) can never disagree about where a key lives.
//!
//! | URL                                   | store                                            |
//! |---------------------------------------|--------------------------------------------------|
//! | `/abs/dir`, `rel/dir`, `file:///dir`  | `LocalFileSystem` rooted at the directory         |
//! | `memory://NAME/prefix`                | a named `InMemory` store, shared within a process |
//! | `s3://bucket/prefix`                  | `AmazonS3`, configured from `AWS_*` variables     |
//! | `gs://bucket/prefix`                  | `GoogleCloudStorage`, from `GOOGLE_*` variables   |
//! | `az://container/prefix` (`azure://`, `abfs://`, `abfss://`) | `MicrosoftAzure`, from `AZURE_*` |
//!
//! The store is opened on the bucket and the URL's path comes back as the prefix every key is
//! built under, so `s3://b/atlas` and `s3://b/atlas/` name the same keys.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;

use crate::DataError;

/// Overrides the S3 endpoint for voxelfleet alone, where `AWS_ENDPOINT_URL` would also redirect
/// every other AWS tool on the machine (the aws CLI talking to real S3 next to a MinIO dataset).
pub const S3_ENDPOINT_ENV: &str = "VOXELFLEET_S3_ENDPOINT";

/// A store URL, parsed and validated but not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory (absolute; relative paths resolve against the current directory).
    Local(PathBuf),
    /// `memory://NAME/prefix`: the process-global in-memory store called NAME.
    Memory { name: String, prefix: Path },
    /// `s3://bucket/prefix`.
    S3 { bucket: String, prefix: Path },
    /// `gs://bucket/prefix`.
    Gcs { bucket: String, prefix: Path },
    /// `az://container/prefix` and its aliases; `authority` may be `container@account.host`.
    Azure {
        scheme: String,
        authority: String,
        prefix: Path,
    },
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, DataError> {
        let invalid = |reason: String| DataError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        if url.is_empty() {
            return Err(invalid("empty".into()));
        }
        let is_scheme = |s: &str| {
            s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        };
        let Some((scheme, rest)) = url.split_once("://").filter(|(s, _)| is_scheme(s)) else {
            // No `://`: a plain path, unless it is `scheme:something` that is not a drive letter.
            return match url::Url::parse(url) {
                Ok(parsed) if parsed.scheme().len() > 1 => Err(unsupported(url, parsed.scheme())),
                _ => Ok(StoreUrl::Local(absolute(url)?)),
            };
        };
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "file" => return file_url(url).map(StoreUrl::Local),
            "memory" | "s3" | "gs" | "az" | "azure" | "abfs" | "abfss" => {}
            // One-letter "schemes" are Windows drive letters (`C://data`), i.e. plain paths.
            s if s.len() == 1 => return Ok(StoreUrl::Local(absolute(url)?)),
            other => return Err(unsupported(url, other)),
        }
        if rest.contains(['?', '#']) {
            return Err(invalid(
                "query strings and fragments are not part of a store URL".into(),
            ));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let what = if scheme == "memory" {
            "store name"
        } else if scheme.starts_with('a') {
            "container"
        } else {
            "bucket"
        };
        if authority.is_empty() {
            return Err(invalid(format!(
                "no {what}: expected {scheme}://{}/prefix",
                what.replace(' ', "-")
            )));
        }
        if scheme != "memory" && !scheme.starts_with('a') && authority.contains(['@', ':']) {
            return Err(invalid(format!(
                "{what} `{authority}` holds credentials or a port; credentials and endpoints come from the \
                 environment (see data::store)"
            )));
        }
        let prefix = prefix_path(path).map_err(invalid)?;
        let authority = authority.to_string();
        Ok(match scheme.as_str() {
            "memory" => StoreUrl::Memory {
                name: authority,
                prefix,
            },
            "s3" => StoreUrl::S3 {
                bucket: authority,
                prefix,
            },
            "gs" => StoreUrl::Gcs {
                bucket: authority,
                prefix,
            },
            _ => StoreUrl::Azure {
                scheme,
                authority,
                prefix,
            },
        })
    }

    /// The prefix inside the bucket; empty for local directories, which are the store's root.
    pub fn prefix(&self) -> Path {
        match self {
            StoreUrl::Local(_) => Path::default(),
            StoreUrl::Memory { prefix, .. }
            | StoreUrl::S3 { prefix, .. }
            | StoreUrl::Gcs { prefix, .. }
            | StoreUrl::Azure { prefix, .. } => prefix.clone(),
        }
    }
}

fn unsupported(url: &str, scheme: &str) -> DataError {
    DataError::UnsupportedScheme {
        url: url.to_string(),
        scheme: scheme.to_string(),
    }
}

/// The URL's path as an object prefix. `..` and `.` are refused rather than resolved: a prefix
/// names keys in a bucket, where nothing collapses them, and in a URL they are almost always a
/// path pasted from a shell. Checked on the raw text because URL parsers resolve them silently.
fn prefix_path(raw: &str) -> Result<Path, String> {
    let trimmed = raw.strip_suffix('/').unwrap_or(raw);
    if trimmed.is_empty() {
        return Ok(Path::default());
    }
    for segment in trimmed.split('/') {
        match segment.to_ascii_lowercase().as_str() {
            "" => return Err(format!("empty path segment in `/{raw}` (a doubled `/`)")),
            "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e." => {
                return Err(format!(
                    "`{segment}` segment in `/{raw}`: give the prefix without `.` or `..`"
                ));
            }
            _ => {}
        }
    }
    Path::from_url_path(trimmed).map_err(|e| format!("bad prefix `/{raw}`: {e}"))
}

fn absolute(path: &str) -> Result<PathBuf, DataError> {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Ok(std::env::current_dir().map_err(|e| DataError::io(".", e))?.join(path))
    }
}

/// `object_store::parse_url` is not used because for `file://` it keeps percent-escapes of the URL
/// path in the object path and roots the store at `/`; `url::Url::to_file_path` decodes correctly.
fn file_url(url: &str) -> Result<PathBuf, DataError> {
    let invalid = |reason: &str| DataError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    parsed
        .to_file_path()
        .map_err(|()| invalid("not an absolute local path"))
}

/// Opens a store URL (see the module table) and returns the store with the prefix inside it.
///
/// A local directory is created if missing and the store is a `LocalFileSystem` rooted *at that
/// directory* with an empty prefix, so keys are dataset-relative (`BDMAP_00000001/ct.nii.gz`) and
/// cannot reach outside it. Cloud stores are configured, not contacted: a wrong credential shows
/// on the first request, with [`credentials_hint`] to explain it.
pub fn store_from_url(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), DataError> {
    let parsed = StoreUrl::parse(url)?;
    let prefix = parsed.prefix();
    let store: Arc<dyn ObjectStore> = match parsed {
        StoreUrl::Local(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
            let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| DataError::Store {
                key: dir.display().to_string(),
                source: e,
            })?;
            Arc::new(store)
        }
        StoreUrl::Memory { name, .. } => memory_store(&name),
        StoreUrl::S3 { bucket, .. } => Arc::new(s3_builder(&bucket).build().map_err(|e| config_error(url, "S3", e))?),
        StoreUrl::Gcs { bucket, .. } => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| config_error(url, "Google Cloud Storage", e))?,
        ),
        StoreUrl::Azure { scheme, authority, .. } => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(format!("{scheme}://{authority}"))
                .build()
                .map_err(|e| config_error(url, "Azure", e))?,
        ),
    };
    Ok((store, prefix))
}

/// `from_env` reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`/`AWS_ENDPOINT`, `AWS_ALLOW_HTTP` and the
/// web-identity and container credential variables. (`object_store::parse_url_opts` reads none of
/// them and would go straight to instance metadata.) Requests are path-style
/// (`endpoint/bucket/key`), which MinIO, Ceph and moto serve without wildcard DNS.
fn s3_builder(bucket: &str) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(endpoint) = std::env::var(S3_ENDPOINT_ENV).ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint);
    }
    // An endpoint someone spelled out as http:// (MinIO on a private network, moto in CI) is
    // meant as plain HTTP; without this object_store refuses every request with an opaque
    // "URL scheme is not allowed", and AWS_ALLOW_HTTP is easy to forget. TLS endpoints and real
    // AWS (no endpoint) are unaffected.
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    if endpoint.is_some_and(|e| e.to_ascii_lowercase().starts_with("http://")) {
        builder = builder.with_allow_http(true);
    }
    builder
}

fn config_error(url: &str, service: &str, e: object_store::Error) -> DataError {
    let hint = credentials_hint(url).map(|h| format!("; {h}")).unwrap_or_default();
    DataError::InvalidUrl {
        url: url.to_string(),
        reason: format!("cannot configure the {service} client: {e}{hint}"),
    }
}

/// For a cloud URL whose usual credential variables are all unset, a sentence saying which ones
/// to set (the client then falls back to instance metadata, which off-cloud fails slowly and
/// obscurely). `None` for local and memory URLs and where credentials are present.
pub fn credentials_hint(url: &str) -> Option<String> {
    let set = |names: &[&str]| names.iter().any(|n| std::env::var_os(n).is_some_and(|v| !v.is_empty()));
    match StoreUrl::parse(url).ok()? {
        StoreUrl::S3 { .. }
            if !set(&[
                "AWS_ACCESS_KEY_ID",
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            ]) =>
        {
            Some(
                "no AWS credentials in the environment (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, plus \
                 AWS_REGION, and AWS_ENDPOINT_URL or VOXELFLEET_S3_ENDPOINT for an S3-compatible store)"
                    .into(),
            )
        }
        StoreUrl::Gcs { .. }
            if !set(&[
                "GOOGLE_SERVICE_ACCOUNT",
                "GOOGLE_SERVICE_ACCOUNT_PATH",
                "GOOGLE_SERVICE_ACCOUNT_KEY",
                "GOOGLE_APPLICATION_CREDENTIALS",
                "SERVICE_ACCOUNT",
            ]) =>
        {
            Some(
                "no Google credentials in the environment (set GOOGLE_APPLICATION_CREDENTIALS or \
                 GOOGLE_SERVICE_ACCOUNT to a service-account key file)"
                    .into(),
            )
        }
        StoreUrl::Azure { .. }
            if !set(&[
                "AZURE_STORAGE_ACCOUNT_KEY",
                "AZURE_STORAGE_ACCESS_KEY",
                "AZURE_STORAGE_CLIENT_SECRET",
                "AZURE_STORAGE_SAS_KEY",
            ]) =>
        {
            Some(
                "no Azure credentials in the environment (set AZURE_STORAGE_ACCOUNT_NAME and \
                 AZURE_STORAGE_ACCOUNT_KEY, or a service principal's AZURE_STORAGE_CLIENT_ID, \
                 AZURE_STORAGE_CLIENT_SECRET and AZURE_STORAGE_TENANT_ID)"
                    .into(),
            )
        }
        _ => None,
    }
}

/// Named in-memory stores. They live as long as the process, and only in it: two processes (a
/// coordinator and its workers) naming `memory://x` see two different stores, so these serve
/// tests and single-process tools, never a cluster.
static MEMORY_STORES: LazyLock<Mutex<HashMap<String, Arc<InMemory>>>> = LazyLock::new(Default::default);

fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    // A poisoned lock only means another thread panicked while inserting; the map is still whole.
    let mut stores = MEMORY_STORES.lock().unwrap_or_else(|p| p.into_inner());
    stores.entry(name.to_string()).or_default().clone()
}

/// The local directory a store URL names, without touching the file system, so a caller can
/// check it before [`store_from_url`] creates it. Only for `file://` URLs and plain paths; other
/// schemes are an error naming the URL (callers that accept any store use [`StoreUrl`]).
pub fn local_dir_from_url(url: &str) -> Result<PathBuf, DataError> {
    match StoreUrl::parse(url)? {
        StoreUrl::Local(dir) => Ok(dir),
        _ => Err(DataError::InvalidUrl {
            url: url.to_string(),
            reason: "not a local directory (a file:// URL or a plain path)".into(),
        }),
    }
}

/// Copies every file under the local directory `dir` into `store` under `prefix`, keeping the
/// relative layout (`dir/a/b.nii.gz` → `prefix/a/b.nii.gz`), and returns how many files it put.
/// For staging a dataset into a bucket in tests and demos; file names must be valid object path
/// segments.
pub async fn put_dir(dir: &std::path::Path, store: &dyn ObjectStore, prefix: &Path) -> Result<usize, DataError> {
    let mut pending = vec![(dir.to_path_buf(), prefix.clone())];
    let mut count = 0;
    while let Some((local, key)) = pending.pop() {
        let entries = std::fs::read_dir(&local).map_err(|e| DataError::io(&local, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(&local, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| DataError::InvalidUrl {
                url: path.display().to_string(),
                reason: "file name is not UTF-8".into(),
            })?;
            let child = key.child(name);
            if entry.file_type().map_err(|e| DataError::io(&path, e))?.is_dir() {
                pending.push((path, child));
            } else {
                let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
                store
                    .put(&child, bytes.into())
                    .await
                    .map_err(|e| DataError::store(&child, e))?;
                count += 1;
            }
        }
    }
    Ok(count)
}
