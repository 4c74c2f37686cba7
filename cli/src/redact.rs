//! Keeps passwords out of everything the tool prints.

/// `url` with the password of its user info replaced by `***`
/// (`postgres://u:***@host/db`). URLs without one are returned unchanged.
pub(crate) fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some((start, end)) => format!("{}***{}", &url[..start], &url[end..]),
        None => url.to_owned(),
    }
}

/// The password of `url`, if it has one.
pub(crate) fn password(url: &str) -> Option<&str> {
    password_span(url)
        .map(|(s, e)| &url[s..e])
        .filter(|p| !p.is_empty())
}

/// Byte range of the password in `scheme://user:password@host...`.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    // The authority ends at the first '/', '?' or '#'; the user info at its last '@'.
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let at = authority.rfind('@')?;
    let colon = authority[..at].find(':')?;
    Some((authority_start + colon + 1, authority_start + at))
}

/// `text` with every occurrence of `url`'s password (as written, and percent-decoded)
/// replaced by `***`: driver errors are not trusted to leave it out.
pub(crate) fn scrub(text: &str, url: Option<&str>) -> String {
    let Some(secret) = url.and_then(password) else {
        return text.to_owned();
    };
    let mut out = text.replace(secret, "***");
    let decoded = percent_decode(secret);
    if !decoded.is_empty() && decoded != secret {
        out = out.replace(&decoded, "***");
    }
    out
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
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://surety:s3cret@127.0.0.1:5432/surety"),
            "postgres://surety:***@127.0.0.1:5432/surety"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@host/db?sslmode=require"),
            "postgres://u:***@host/db?sslmode=require"
        );
        assert_eq!(redact_url("postgres://u@host/db"), "postgres://u@host/db");
        assert_eq!(redact_url("sqlite://./a.db"), "sqlite://./a.db");
        assert_eq!(redact_url("sqlite:a.db"), "sqlite:a.db");
        assert_eq!(
            scrub(
                "auth failed for s3cr/t and s3cr%2Ft",
                Some("postgres://u:s3cr%2Ft@h/d")
            ),
            "auth failed for *** and ***"
        );
    }
}
