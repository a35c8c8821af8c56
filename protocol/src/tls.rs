//! Optional TLS for connections to the coordinator (rustls through tonic). The bearer token says
//! who may talk to the coordinator; TLS keeps that token, run specs and metrics from being read
//! or altered on the way. `serve --tls-cert/--tls-key` turns it on; clients and workers then dial
//! `https://` and trust the CA given with `--tls-ca`. No system trust store is read: a
//! deployment's coordinator certificate comes from its own CA.
//!
//! Every error names the flag and the file, since a wrong path is the usual mistake.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Environment variable clients and workers read `--tls-ca` from.
pub const TLS_CA_ENV: &str = "VOXELFLEET_TLS_CA";

/// Longest PEM file read; certificate chains are a few kilobytes.
const MAX_PEM_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {message}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
    // The io error is shown, not chained: anyhow's `{:#}` would print it twice.
    #[error("{flag} {}: {error}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("coordinator endpoint `{endpoint}`: {message}")]
    Endpoint { endpoint: String, message: String },
}

/// Reads a PEM file given with `flag`, checking that it holds a block of the `kind` expected
/// ("CERTIFICATE", "PRIVATE KEY"), so a swapped or empty file is named here and not as an opaque
/// handshake failure later.
pub fn read_pem(flag: &'static str, path: &Path, kind: &str) -> Result<Vec<u8>, TlsError> {
    let read = |error| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        error,
    };
    let pem_error = |message: String| TlsError::Pem {
        flag,
        path: path.to_path_buf(),
        message,
    };
    if std::fs::metadata(path).map_err(read)?.len() > MAX_PEM_BYTES {
        return Err(pem_error(format!(
            "larger than {MAX_PEM_BYTES} bytes; is it a PEM file?"
        )));
    }
    let pem = std::fs::read(path).map_err(read)?;
    let text = String::from_utf8_lossy(&pem);
    // "-----BEGIN PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----", "-----BEGIN CERTIFICATE-----".
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if !has_block {
        return Err(pem_error(format!("holds no PEM {kind} block")));
    }
    Ok(pem)
}

/// The endpoint to dial for `url`: `https://` with the CA from `--tls-ca`, or plain `http://`
/// without one. A CA with an `http://` URL, or `https://` without a CA, is refused: either would
/// silently not do what the user meant.
pub fn client_endpoint(url: &str, tls_ca: Option<&Path>) -> Result<Endpoint, TlsError> {
    let endpoint_error = |message: String| TlsError::Endpoint {
        endpoint: url.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| endpoint_error(e.to_string()))?;
    let https = url.starts_with("https://");
    match (tls_ca, https) {
        (Some(ca), true) => {
            let pem = read_pem("--tls-ca", ca, "CERTIFICATE")?;
            endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| TlsError::Pem {
                    flag: "--tls-ca",
                    path: ca.to_path_buf(),
                    message: e.to_string(),
                })
        }
        (Some(ca), false) => Err(endpoint_error(format!(
            "--tls-ca {} is given, so the endpoint must be https://",
            ca.display()
        ))),
        (None, true) => Err(endpoint_error(
            "an https:// coordinator needs --tls-ca (the PEM of the CA that signed its certificate)".into(),
        )),
        (None, false) => Ok(endpoint),
    }
}

/// The server side: the coordinator's certificate chain and private key, both PEM.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerTlsConfig, TlsError> {
    let cert_pem = read_pem("--tls-cert", cert, "CERTIFICATE")?;
    let key_pem = read_pem("--tls-key", key, "PRIVATE KEY")?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_pems_are_checked_and_errors_name_flag_and_file() {
        assert!(client_endpoint("http://127.0.0.1:7070", None).is_ok());
        let err = client_endpoint("https://127.0.0.1:7070", None).unwrap_err().to_string();
        assert!(
            err.contains("--tls-ca") && err.contains("https://127.0.0.1:7070"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("voxelfleet-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let err = client_endpoint("http://127.0.0.1:7070", Some(&ca))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be https://"), "{err}");
        let err = client_endpoint("https://127.0.0.1:7070", Some(&ca))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--tls-ca") && err.contains("ca.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );

        let missing = dir.join("missing.pem");
        let err = server_config(&missing, &ca).unwrap_err().to_string();
        assert!(err.contains("--tls-cert") && err.contains("missing.pem"), "{err}");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let err = server_config(&ca, &ca).unwrap_err().to_string();
        assert!(err.contains("--tls-key") && err.contains("PRIVATE KEY"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
