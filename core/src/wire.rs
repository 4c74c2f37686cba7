//! Bytes from the wire as header text: what a foreign producer writes reaches the
//! handler, whatever it is.
//!
//! Surety's headers are text. A header value (or key) that a producer wrote as bytes
//! which are not UTF-8 is escaped, not dropped: valid UTF-8 runs are kept, each byte of an
//! invalid sequence becomes `\xNN`, and a backslash in such a value becomes `\\`, so the
//! escaping can be undone. Values that are valid UTF-8 are passed through untouched.

/// `bytes` as header text: unchanged when it is UTF-8, escaped otherwise (see the module).
pub fn wire_text(bytes: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_unchanged_and_other_bytes_are_escaped_reversibly() {
        assert_eq!(wire_text(b"plain \\ text"), "plain \\ text");
        assert_eq!(wire_text(&[0x61, 0xff, 0x5c, 0x62]), "a\\xff\\\\b");
        assert_eq!(wire_text(&[0xc3]), "\\xc3");
        assert_eq!(wire_text(b""), "");
    }
}
