//! Live recovery's client side: a rank of a re-formed ring fetches the training state a
//! surviving rank holds, over that survivor's collective endpoint, instead of reading the last
//! checkpoint. Each part arrives in bounded chunks and is checked against the hash the
//! survivor computed.

use std::time::Duration;

use protocol::auth::SharedToken;
use protocol::pb;
use protocol::pb::collective_client::CollectiveClient;
use sha2::{Digest, Sha256};

use super::CollectiveError;

/// The named parts of the state `peer` holds for (`run_id`, `attempt`) after `step` steps.
pub async fn fetch_state(
    token: &SharedToken,
    peer: &str,
    run_id: &str,
    attempt: u32,
    step: u64,
    timeout: Duration,
) -> Result<Vec<(String, Vec<u8>)>, CollectiveError> {
    let endpoint = if peer.contains("://") {
        peer.to_string()
    } else {
        format!("http://{peer}")
    };
    let failed = |message: String| CollectiveError::Connect {
        rank: u32::MAX,
        addr: peer.to_string(),
        message,
    };
    let fetch = async {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|e| failed(e.to_string()))?
            .connect()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut client =
            CollectiveClient::new(token.channel(channel)).max_decoding_message_size(2 * protocol::MAX_CHUNK_BYTES);
        let req = pb::FetchStateRequest {
            run_id: run_id.to_string(),
            attempt,
            step,
        };
        let mut stream = client
            .fetch_state(req)
            .await
            .map_err(|s| failed(s.message().to_string()))?
            .into_inner();
        let mut parts: Vec<(String, Vec<u8>)> = vec![];
        let mut complete = true;
        while let Some(chunk) = stream.message().await.map_err(|s| failed(s.message().to_string()))? {
            match parts.last_mut() {
                Some((name, bytes)) if *name == chunk.name && !complete => bytes.extend_from_slice(&chunk.data),
                _ => parts.push((chunk.name.clone(), chunk.data.clone())),
            }
            complete = !chunk.sha256.is_empty();
            if complete {
                let (name, bytes) = parts.last().expect("pushed above");
                let sha = hex::encode(Sha256::digest(bytes));
                if sha != chunk.sha256 {
                    return Err(failed(format!(
                        "part {name} arrived with SHA-256 {sha}, sent as {}",
                        chunk.sha256
                    )));
                }
            }
        }
        if !complete {
            return Err(failed("the state stream ended inside a part".into()));
        }
        Ok(parts)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| failed(format!("no complete state within {timeout:?}")))?
}
