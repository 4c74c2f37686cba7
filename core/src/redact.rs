//! The one rule that keeps secrets out of everything Surety prints: configs' `Debug`,
//! errors, logs and the CLI's output.
//!
//! A secret in a URL is the password of its user info, and the value of any query
//! parameter whose name says it carries one (`password`, `secret_key`, `sasl.password`,
//! `token`, ... : a name containing `pass`, `secret`, `token`, `credential` or `jaas`,
//! in any case). Passwords may hold `/ @ % :` unencoded: the user info runs to the last
//! `@` before the query, not to the first `/`. When in doubt the rule masks too much,
//! never too little.
//!
//! ```
//! use surety_core::redact::redact_url;
//! assert_eq!(
//!     redact_url("amqp://app:p/a@ss@127.0.0.1:5672/%2f"),
//!     "amqp://app:***@127.0.0.1:5672/%2f"
//! );
//! assert_eq!(
//!     redact_url("rocketmq://127.0.0.1:9876?access_key=ak&secret_key=sk"),
//!     "rocketmq://127.0.0.1:9876?access_key=ak&secret_key=***"
//! );
//! ```

use std::ops::Range;

/// What replaces a secret.
pub const MASK: &str = "***";

/// Fragments of a query parameter's name (lower case) that mark its value as secret.
const SECRET_NAMES: &[&str] = &["pass", "secret", "token", "credential", "jaas"];

/// `url` with every secret replaced by [`MASK`]. Text without `://` is returned as is.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    // From the end, so that earlier ranges stay valid.
    for range in secret_ranges(url).into_iter().rev() {
        out.replace_range(range, MASK);
    }
    out
}

/// `text` with the secrets of every URL in it (a `scheme://` up to the next whitespace)
/// replaced by [`MASK`]: for messages of parsers and drivers that quote a URL.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let start = rest[..pos]
            .rfind(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .map_or(0, |i| i + 1);
        let end = rest[pos..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .map_or(rest.len(), |i| pos + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The secrets of `url`, as written (percent-encoded where the URL encodes them).
pub fn secrets(url: &str) -> Vec<&str> {
    secret_ranges(url)
        .into_iter()
        .map(|r| &url[r])
        .filter(|s| !s.is_empty())
        .collect()
}

/// `text` with every secret of `url` replaced by [`MASK`], as written and percent-decoded:
/// a driver's error is not trusted to leave the password out.
pub fn scrub(text: &str, url: Option<&str>) -> String {
    let mut out = text.to_owned();
    for secret in url.map(secrets).unwrap_or_default() {
        out = out.replace(secret, MASK);
        let decoded = percent_decode(secret);
        if !decoded.is_empty() && decoded != secret {
            out = out.replace(&decoded, MASK);
        }
    }
    out
}

/// Byte ranges of `url`'s secrets, in order.
fn secret_ranges(url: &str) -> Vec<Range<usize>> {
    let Some(scheme_end) = url.find("://").map(|p| p + 3) else {
        return Vec::new();
    };
    let mut ranges = Vec::new();
    // The query starts at the first `?`; a fragment at the first `#` after it.
    let query_start = url[scheme_end..].find(['?', '#']).map(|i| scheme_end + i);
    let before_query = query_start.unwrap_or(url.len());
    if let Some(at) = url[scheme_end..before_query].rfind('@') {
        let user_info = scheme_end..scheme_end + at;
        if let Some(colon) = url[user_info.clone()].find(':') {
            ranges.push(user_info.start + colon + 1..user_info.end);
        }
    }
    if let Some(q) = query_start.filter(|&q| url[q..].starts_with('?')) {
        let query_end = url[q..].find('#').map_or(url.len(), |i| q + i);
        let mut offset = q + 1;
        for pair in url[q + 1..query_end].split('&') {
            if let Some(eq) = pair.find('=') {
                let name = pair[..eq].to_ascii_lowercase();
                if SECRET_NAMES.iter().any(|s| name.contains(s)) {
                    ranges.push(offset + eq + 1..offset + pair.len());
                }
            }
            offset += pair.len() + 1;
        }
    }
    ranges
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_passwords_are_masked_whatever_they_hold() {
        for (url, want) in [
            (
                "postgres://surety:s3cret@127.0.0.1:5432/surety",
                "postgres://surety:***@127.0.0.1:5432/surety",
            ),
            ("amqp://u:p@ss@h/%2f", "amqp://u:***@h/%2f"),
            (
                "amqp://guest:wr/ong@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            (
                "amqp://u:a:b%2F/c@d@h:5672/vh?heartbeat=5",
                "amqp://u:***@h:5672/vh?heartbeat=5",
            ),
            (
                "amqps://bob:s3cr%2Ft@host:5671/vh",
                "amqps://bob:***@host:5671/vh",
            ),
            ("postgres://u@host/db", "postgres://u@host/db"),
            ("amqp://host/%2f", "amqp://host/%2f"),
            ("sqlite://./a.db", "sqlite://./a.db"),
            ("sqlite:a.db", "sqlite:a.db"),
            ("memory:", "memory:"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn secret_query_parameters_are_masked() {
        assert_eq!(
            redact_url("rocketmq://127.0.0.1:9876;127.0.0.1:9877?access_key=ak&secret_key=s/k@1"),
            "rocketmq://127.0.0.1:9876;127.0.0.1:9877?access_key=ak&secret_key=***"
        );
        assert_eq!(
            redact_url("kafka://h:9092?sasl.username=me&sasl.password=pw&Token=t#frag"),
            "kafka://h:9092?sasl.username=me&sasl.password=***&Token=***#frag"
        );
        assert_eq!(
            redact_url("postgres://u:p@h/db?sslmode=require&password=x"),
            "postgres://u:***@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("kafka://h:9092?acks=all"),
            "kafka://h:9092?acks=all"
        );
    }

    #[test]
    fn urls_inside_text_are_masked() {
        assert_eq!(
            redact_text("invalid URL amqp://u:p/w@h:x/%2f: invalid port number"),
            "invalid URL amqp://u:***@h:x/%2f: invalid port number"
        );
        assert_eq!(
            redact_text("a 'kafka://h?secret=s' and \"amqp://u:v@h\""),
            "a 'kafka://h?secret=***' and \"amqp://u:***@h\""
        );
    }

    #[test]
    fn scrub_removes_secrets_as_written_and_decoded() {
        assert_eq!(
            scrub(
                "auth failed for s3cr/t and s3cr%2Ft",
                Some("postgres://u:s3cr%2Ft@h/d")
            ),
            "auth failed for *** and ***"
        );
        assert_eq!(
            scrub("key sk1 refused", Some("rocketmq://h:9876?secret_key=sk1")),
            "key *** refused"
        );
        assert_eq!(scrub("nothing", None), "nothing");
    }
}
