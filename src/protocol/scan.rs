//! The pass over a client frame's bytes before serde sees it: how deep it nests (so serde never
//! recurses into hostile input) and whether it is plain enough for its body to be kept raw.

/// What one pass over a frame found.
pub(super) struct Scan {
    /// Arrays and objects nest deeper than allowed.
    pub(super) too_deep: bool,
    /// Nothing that serde_json refuses beyond syntax: no number with an exponent or 300 digits
    /// (it could overflow: `1e400`) and no `\uD800`-`\uDFFF` escape (it could be a lone
    /// surrogate). A raw body is syntax-checked only, so without this a body the general path
    /// refuses would be stored where the relay's own readers fail on it. Escaped surrogate
    /// pairs are valid but rare (clients send UTF-8), so they just take the general path.
    pub(super) plain: bool,
}

/// One linear pass: the nesting depth (so serde never recurses into hostile input) and whether
/// the JSON is plain (see [`Scan`]). String contents are skipped with `memchr`, so the text of a
/// message costs little.
pub(super) fn scan(bytes: &[u8], max_depth: usize) -> Scan {
    let mut scan = Scan {
        too_deep: false,
        plain: true,
    };
    let (mut depth, mut digits, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        match b {
            b'"' => {
                // To the closing quote, past escapes.
                digits = 0;
                loop {
                    // (Past the end after a trailing backslash: an unterminated string.)
                    let rest = bytes.get(i..).unwrap_or_default();
                    let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                        return scan;
                    };
                    i += at + 1;
                    if bytes[i - 1] == b'"' {
                        break;
                    }
                    if bytes.get(i) == Some(&b'u') && matches!(bytes.get(i + 1), Some(b'd' | b'D'))
                    {
                        scan.plain = false;
                    }
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    scan.too_deep = true;
                    return scan;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'0'..=b'9' => {
                digits += 1;
                if digits >= 300 {
                    scan.plain = false;
                }
                continue;
            }
            b'e' | b'E' if digits > 0 => scan.plain = false,
            b'.' if digits > 0 => continue,
            _ => {}
        }
        digits = 0;
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_exceeds(bytes: &[u8], max: usize) -> bool {
        scan(bytes, max).too_deep
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        let s = format!(
            r#"{{"hd":{{"event":"chat.message"}},"bd":{{"text":"{}"}}}}"#,
            "[".repeat(100)
        );
        assert!(!depth_exceeds(s.as_bytes(), 2));
        assert!(!depth_exceeds(br#"{"a":"\"[[[["}"#, 2));
        // Unterminated strings, a trailing backslash: no panic, nothing counted inside.
        for text in [
            &br#"{"a":"\"#[..],
            br#"{"a":"\u"#,
            br#"{"a":"[[[["#,
            br#"""#,
        ] {
            assert!(!depth_exceeds(text, 1));
        }
    }

    #[test]
    fn exponents_long_numbers_and_surrogate_escapes_are_not_plain() {
        for text in [
            r#"{"n":1e4}"#,
            r#"{"n":1.5E-3}"#,
            r#"{"s":"\ud83c"}"#,
            r#"{"s":"\uDFFF"}"#,
        ] {
            assert!(!scan(text.as_bytes(), 8).plain, "{text}");
        }
        let long = format!(r#"{{"n":{}}}"#, "9".repeat(300));
        assert!(!scan(long.as_bytes(), 8).plain);
        for text in [
            r#"{"t":true,"f":false,"n":-1.25,"s":"e1 \u00e9 \\ud83c"}"#,
            r#"{"n":1e}"#,
        ] {
            let plain = scan(text.as_bytes(), 8).plain;
            assert_eq!(plain, !text.contains("1e}"), "{text}");
        }
    }
}
