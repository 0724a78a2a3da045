//! A request body's bytes as JSON text, decoded as the reference host
//! decodes them (Python's `json.loads` on bytes): RFC 8259 allows only
//! UTF-8 on the wire, but the reference also takes UTF-16 and UTF-32, told
//! apart by a byte order mark or, without one, by where the zero bytes of
//! the first characters fall (JSON text starts with ASCII). And how deep
//! that text may nest ([`MAX_DEPTH`]), and its parse within that bound.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

/// The deepest nesting of arrays and objects a body may have; a deeper one
/// gets the 400 of a body that does not parse. The reference parses with
/// Python's `json`, which gives up at Python's recursion limit of 1000,
/// less the frames of its own call path (at 963 levels with Python 3.11).
/// etl-serve takes the round figure, so that every body the reference
/// parses, it parses too.
pub const MAX_DEPTH: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Utf8,
    Utf16 { big_endian: bool },
    Utf32 { big_endian: bool },
}

/// The body as text, or `Err` when it does not decode in the encoding its
/// first bytes announce. Plain UTF-8, nearly every body, is borrowed.
pub fn json_text(body: &[u8]) -> Result<Cow<'_, str>, ()> {
    let (encoding, bom) = detect(body);
    let rest = &body[bom..];
    match encoding {
        Encoding::Utf8 => std::str::from_utf8(rest).map(Cow::Borrowed).map_err(|_| ()),
        Encoding::Utf16 { big_endian } => {
            if rest.len() % 2 != 0 {
                return Err(());
            }
            let units = rest.chunks_exact(2).map(|c| {
                let pair = [c[0], c[1]];
                if big_endian {
                    u16::from_be_bytes(pair)
                } else {
                    u16::from_le_bytes(pair)
                }
            });
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .map(Cow::Owned)
                .map_err(|_| ())
        }
        Encoding::Utf32 { big_endian } => {
            if rest.len() % 4 != 0 {
                return Err(());
            }
            rest.chunks_exact(4)
                .map(|c| {
                    let quad = [c[0], c[1], c[2], c[3]];
                    let n = if big_endian {
                        u32::from_be_bytes(quad)
                    } else {
                        u32::from_le_bytes(quad)
                    };
                    char::from_u32(n).ok_or(())
                })
                .collect::<Result<String, ()>>()
                .map(Cow::Owned)
        }
    }
}

/// Whether the JSON `text` nests arrays and objects more than `limit`
/// levels deep. Brackets inside strings do not count. Exact for valid
/// JSON; for text that is not, parsing fails anyway.
pub fn nests_deeper_than(text: &str, limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            _ if in_string => {}
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `text` parsed, without serde_json's own limit of 128 levels: the caller
/// has checked it against [`MAX_DEPTH`] instead.
pub fn parse(text: &str) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let value = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// The encoding of `body`, and the length of its byte order mark.
fn detect(body: &[u8]) -> (Encoding, usize) {
    const BE: bool = true;
    const LE: bool = false;
    // UTF-32's little-endian mark starts with UTF-16's: look at it first.
    match body {
        [0x00, 0x00, 0xFE, 0xFF, ..] => return (Encoding::Utf32 { big_endian: BE }, 4),
        [0xFF, 0xFE, 0x00, 0x00, ..] => return (Encoding::Utf32 { big_endian: LE }, 4),
        [0xFE, 0xFF, ..] => return (Encoding::Utf16 { big_endian: BE }, 2),
        [0xFF, 0xFE, ..] => return (Encoding::Utf16 { big_endian: LE }, 2),
        [0xEF, 0xBB, 0xBF, ..] => return (Encoding::Utf8, 3),
        _ => {}
    }
    // No mark: the first character is ASCII, so its zero bytes give the
    // width and the byte order.
    let encoding = match body {
        [0, 0, _, _, ..] => Encoding::Utf32 { big_endian: BE },
        [0, _, _, _, ..] => Encoding::Utf16 { big_endian: BE },
        [_, 0, 0, 0, ..] => Encoding::Utf32 { big_endian: LE },
        [_, 0, _, _, ..] => Encoding::Utf16 { big_endian: LE },
        [0, _] => Encoding::Utf16 { big_endian: BE },
        [_, 0] => Encoding::Utf16 { big_endian: LE },
        _ => Encoding::Utf8,
    };
    (encoding, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{accept, reject, wordcount, JSON};
    use serde_json::json;

    fn utf16(s: &str, big_endian: bool) -> Vec<u8> {
        s.encode_utf16()
            .flat_map(|u| {
                if big_endian {
                    u.to_be_bytes()
                } else {
                    u.to_le_bytes()
                }
            })
            .collect()
    }

    fn utf32(s: &str, big_endian: bool) -> Vec<u8> {
        s.chars()
            .flat_map(|c| {
                if big_endian {
                    (c as u32).to_be_bytes()
                } else {
                    (c as u32).to_le_bytes()
                }
            })
            .collect()
    }

    #[test]
    fn every_encoding_the_reference_takes_decodes() {
        let text = r#"{"text":"héllo wörld 🌍"}"#;
        let mut bodies = vec![
            text.as_bytes().to_vec(),
            [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat(),
        ];
        for be in [true, false] {
            bodies.push(utf16(text, be));
            bodies.push(utf32(text, be));
            let bom16 = if be { [0xFE, 0xFF] } else { [0xFF, 0xFE] };
            bodies.push([&bom16[..], &utf16(text, be)].concat());
            let bom32 = if be {
                [0, 0, 0xFE, 0xFF]
            } else {
                [0xFF, 0xFE, 0, 0]
            };
            bodies.push([&bom32[..], &utf32(text, be)].concat());
        }
        for body in bodies {
            assert_eq!(json_text(&body).as_deref(), Ok(text), "{body:?}");
        }
        // A two-byte body, such as `1` in UTF-16.
        assert_eq!(json_text(&[b'1', 0]).as_deref(), Ok("1"));
    }

    #[test]
    fn nesting_is_counted_outside_strings() {
        assert!(!nests_deeper_than(r#"{"a":[1,{"b":[]}]}"#, 4));
        assert!(nests_deeper_than(r#"{"a":[1,{"b":[]}]}"#, 3));
        assert!(!nests_deeper_than(r#"["[[[", "\"[[[", {"k\\": "{{"}]"#, 2));
        assert!(nests_deeper_than(r#"["\\", [[]]]"#, 2));
        let deep = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!nests_deeper_than(&deep(MAX_DEPTH), MAX_DEPTH));
        assert!(nests_deeper_than(&deep(MAX_DEPTH + 1), MAX_DEPTH));
        // Past serde_json's own limit (within a test thread's stack).
        assert!(serde_json::from_str::<Value>(&deep(200)).is_err());
        assert_eq!(parse(&deep(200)).map(|v| v.is_array()).ok(), Some(true));
    }

    #[test]
    fn what_does_not_decode_is_an_error() {
        for body in [
            &b"{\"text\":\"\xff\xfe\"}"[..],
            b"{\"text\":\"a\xc3\"}",
            b"{\"text\":\"caf\xe9\"}",
            // UTF-16 of odd length, and a lone surrogate.
            &[b'{', 0, b'}', 0, b'x'],
            &[0xFF, 0xFE, 0x00, 0xD8, b'}', 0],
        ] {
            assert_eq!(json_text(body), Err(()), "{body:?}");
        }
    }

    #[test]
    fn a_lone_surrogate_anywhere_is_malformed_json_on_both_paths() {
        let malformed = json!({"detail": "Invalid JSON body", "reason": "malformed_envelope"});
        for m in [wordcount(), wordcount().without_fast_path()] {
            for field in ["extra", "invocation_settings", "invocation_context"] {
                let lone = format!(r#"{{"text":"a","{field}":{{"tenant_id":"\ud800"}}}}"#);
                let r = m.prepare(JSON, lone.as_bytes()).map(|_| ()).unwrap_err();
                assert_eq!((r.status, r.body), (422, malformed.clone()), "{field}");
                let pair = lone.replace(r"\ud800", r"\ud83d\ude00");
                assert!(m.prepare(JSON, pair.as_bytes()).is_ok(), "{field}");
            }
        }
    }

    /// `levels` arrays, one in the other.
    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn bodies_nest_as_deep_as_the_reference_parses_and_deeper_get_its_400() {
        // With the stack etl-serve gives its threads: a test thread's 2 MiB
        // is too little for MAX_DEPTH in a debug build.
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(deep_bodies)
            .unwrap()
            .join()
            .unwrap();
    }

    fn deep_bodies() {
        let parse_error = json!({"detail": "There was an error parsing the body"});
        for m in [wordcount(), wordcount().without_fast_path()] {
            // Inside the body's object, which is the first level.
            let inner = MAX_DEPTH - 1;
            for field in ["extra", "invocation_settings", "invocation_context"] {
                let within = format!(r#"{{"text":"a","{field}":{{"k":{}}}}}"#, nested(inner - 1));
                let past = format!(r#"{{"text":"a","{field}":{{"k":{}}}}}"#, nested(inner));
                if field == "extra" {
                    assert_eq!(accept(&m, &within), json!({"text": "a", "repeat": 1}));
                } else {
                    // The reserved fields' own checks answer, not the parser.
                    let answer = m.prepare(JSON, within.as_bytes()).map(|_| ());
                    assert_ne!(
                        answer.map_err(|r| r.body),
                        Err(parse_error.clone()),
                        "{field}"
                    );
                }
                let refused = m.prepare(JSON, past.as_bytes()).unwrap_err();
                assert_eq!(
                    (refused.status, refused.body),
                    (400, parse_error.clone()),
                    "{field}"
                );
            }
            // Past serde_json's own limit of 128, a declared input is
            // checked like any other value.
            let deep_text = format!(r#"{{"text":{}}}"#, nested(200));
            assert_eq!(
                reject(&m, JSON, &deep_text)["detail"][0]["type"],
                "string_type"
            );
            // Brackets inside strings are text.
            let brackets = format!(r#"{{"text":"{}"}}"#, "[".repeat(2 * MAX_DEPTH));
            assert_eq!(
                accept(&m, &brackets)["text"].as_str().unwrap().len(),
                2 * MAX_DEPTH
            );
            assert_eq!(reject(&m, JSON, &"[".repeat(100_000)), parse_error);
        }
    }
}
