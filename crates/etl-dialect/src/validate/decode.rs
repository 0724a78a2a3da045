//! A request body's bytes as JSON text, decoded as the reference host
//! decodes them (Python's `json.loads` on bytes): RFC 8259 allows only
//! UTF-8 on the wire, but the reference also takes UTF-16 and UTF-32, told
//! apart by a byte order mark or, without one, by where the zero bytes of
//! the first characters fall (JSON text starts with ASCII).

use std::borrow::Cow;

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
}
