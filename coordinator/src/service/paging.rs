//! Paged replies. gRPC refuses to decode a message over its limit (4 MiB by default in tonic),
//! so a listing that grows with history (runs, a sweep's children) is cut into pages that each
//! stay well below it, whatever the page size asked for; the reply carries a token for the rest.

use prost::Message;
use tonic::Status;

/// A page's encoded size at most: room under tonic's 4 MiB default for the reply's other fields.
pub const MAX_PAGE_BYTES: usize = 3 << 20;
/// Items per page when the request names no limit.
pub const DEFAULT_PAGE_ITEMS: usize = 1000;

/// Takes `(cursor, item)` pairs, in order, while fewer than `limit` are taken (0: the default)
/// and their encoded size stays under `MAX_PAGE_BYTES`. Returns the page and, when items are
/// left over, the cursor of the last one taken, from which the next page continues.
pub fn page<T: Message>(items: impl IntoIterator<Item = (u64, T)>, limit: u32) -> (Vec<T>, Option<u64>) {
    let limit = items_per_page(limit);
    let mut taken = vec![];
    let mut bytes = 0;
    let mut last = None;
    for (cursor, item) in items {
        // Each repeated item costs its length prefix and tag too.
        let size = item.encoded_len() + 8;
        if taken.len() == limit || (!taken.is_empty() && bytes + size > MAX_PAGE_BYTES) {
            return (taken, last);
        }
        bytes += size;
        last = Some(cursor);
        taken.push(item);
    }
    (taken, None)
}

/// The page size a request's `limit` asks for.
pub fn items_per_page(limit: u32) -> usize {
    match limit {
        0 => DEFAULT_PAGE_ITEMS,
        n => n as usize,
    }
}

/// Decodes a page token (a cursor from `page`); empty starts from the beginning.
pub fn cursor(token: &str) -> Result<Option<u64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token.parse().map(Some).map_err(|_| {
        Status::invalid_argument(format!(
            "page_token `{token}` is not one this server gave out; pass the next_page_token of the previous reply"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::pb;

    fn info(n: u64, message_bytes: usize) -> (u64, pb::RunInfo) {
        let run = pb::RunInfo {
            run_id: format!("run-{n}"),
            message: "x".repeat(message_bytes),
            ..Default::default()
        };
        (n, run)
    }

    #[test]
    fn a_page_stops_at_its_limit_and_says_where_to_go_on() {
        let (taken, next) = page((0..10).map(|n| info(n, 10)), 4);
        assert_eq!(taken.len(), 4);
        assert_eq!(next, Some(3));
        let (taken, next) = page((0..3).map(|n| info(n, 10)), 4);
        assert_eq!((taken.len(), next), (3, None));
    }

    #[test]
    fn no_page_outgrows_the_message_limit_whatever_the_limit_asked() {
        // 40,000 runs with long messages: what broke `coordinator runs` at 30,000.
        let items = (0..40_000).map(|n| info(n, 200));
        let (taken, next) = page(items, u32::MAX);
        let reply = pb::ListRunsResponse {
            runs: taken,
            next_page_token: next.unwrap().to_string(),
            total: 40_000,
        };
        assert!(reply.encoded_len() < 4 << 20, "{}", reply.encoded_len());
        assert!(reply.runs.len() > 1000);
        assert_eq!(cursor(&reply.next_page_token).unwrap(), next);
        assert!(cursor("nope").is_err());
    }
}
