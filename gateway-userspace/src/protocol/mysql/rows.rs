//! Result rows, text and binary, read value by value and rewritten.
//!
//! A text row is one length-encoded string per column (`0xFB`: NULL). A
//! binary row (`COM_STMT_EXECUTE`) is `0x00`, a NULL bitmap offset by two
//! bits, then each non-NULL value in its type's encoding: fixed-width
//! integers and floats, a one-byte length before dates and times, a
//! length-encoded string for everything else. Fails closed: a row whose
//! values do not add up to its length, or of a type this does not know, is
//! an error (the proxy then ends the connection; the row is never sent).

use std::{borrow::Cow, ops::Range};

use bytes::BufMut as _;
use mysql_common::{constants::ColumnType, io::ParseBuf};

use super::codec::ProtocolError;

/// What to put in place of one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Keep,
    Null,
    /// New text (for a binary row: only for a column [`is_textual`]).
    Text(String),
}

/// Whether values of the type are text a mask can rewrite in place (else a
/// masked value becomes NULL: a masked number is not a number).
pub fn is_textual(t: ColumnType) -> bool {
    use ColumnType::{
        MYSQL_TYPE_BLOB, MYSQL_TYPE_ENUM, MYSQL_TYPE_JSON, MYSQL_TYPE_LONG_BLOB,
        MYSQL_TYPE_MEDIUM_BLOB, MYSQL_TYPE_SET, MYSQL_TYPE_STRING, MYSQL_TYPE_TINY_BLOB,
        MYSQL_TYPE_VAR_STRING, MYSQL_TYPE_VARCHAR,
    };
    matches!(
        t,
        MYSQL_TYPE_VARCHAR
            | MYSQL_TYPE_VAR_STRING
            | MYSQL_TYPE_STRING
            | MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB
            | MYSQL_TYPE_BLOB
            | MYSQL_TYPE_JSON
            | MYSQL_TYPE_ENUM
            | MYSQL_TYPE_SET
    )
}

fn bad_row() -> ProtocolError {
    ProtocolError::Malformed { what: "result row" }
}

/// Byte ranges of a text row's values (`None`: NULL).
pub fn text_values(p: &[u8], columns: usize) -> Result<Vec<Option<Range<usize>>>, ProtocolError> {
    let mut out = Vec::with_capacity(columns);
    let mut at = 0;
    for _ in 0..columns {
        if p.get(at) == Some(&0xFB) {
            out.push(None);
            at += 1;
            continue;
        }
        let mut b = ParseBuf(p.get(at..).ok_or_else(bad_row)?);
        let before = b.len();
        let len = b.checked_eat_lenenc_int().ok_or_else(bad_row)?;
        let start = at + (before - b.len());
        let end = start
            .checked_add(usize::try_from(len).map_err(|_| bad_row())?)
            .filter(|&e| e <= p.len())
            .ok_or_else(bad_row)?;
        out.push(Some(start..end));
        at = end;
    }
    if at != p.len() {
        return Err(bad_row());
    }
    Ok(out)
}

/// Width of a fixed-size binary value; `None` for length-prefixed types.
fn fixed_width(t: ColumnType) -> Result<Option<usize>, ProtocolError> {
    use ColumnType::{
        MYSQL_TYPE_DOUBLE, MYSQL_TYPE_FLOAT, MYSQL_TYPE_INT24, MYSQL_TYPE_LONG,
        MYSQL_TYPE_LONGLONG, MYSQL_TYPE_NULL, MYSQL_TYPE_SHORT, MYSQL_TYPE_TINY,
        MYSQL_TYPE_TYPED_ARRAY, MYSQL_TYPE_UNKNOWN, MYSQL_TYPE_YEAR,
    };
    Ok(match t {
        MYSQL_TYPE_NULL => Some(0),
        MYSQL_TYPE_TINY => Some(1),
        MYSQL_TYPE_SHORT | MYSQL_TYPE_YEAR => Some(2),
        MYSQL_TYPE_INT24 | MYSQL_TYPE_LONG | MYSQL_TYPE_FLOAT => Some(4),
        MYSQL_TYPE_LONGLONG | MYSQL_TYPE_DOUBLE => Some(8),
        MYSQL_TYPE_TYPED_ARRAY | MYSQL_TYPE_UNKNOWN => {
            return Err(ProtocolError::Unsupported {
                what: format!("a binary value of type {t:?}"),
            });
        }
        _ => None,
    })
}

fn is_temporal(t: ColumnType) -> bool {
    use ColumnType::{
        MYSQL_TYPE_DATE, MYSQL_TYPE_DATETIME, MYSQL_TYPE_DATETIME2, MYSQL_TYPE_NEWDATE,
        MYSQL_TYPE_TIME, MYSQL_TYPE_TIME2, MYSQL_TYPE_TIMESTAMP, MYSQL_TYPE_TIMESTAMP2,
    };
    matches!(
        t,
        MYSQL_TYPE_DATE
            | MYSQL_TYPE_DATETIME
            | MYSQL_TYPE_TIMESTAMP
            | MYSQL_TYPE_TIME
            | MYSQL_TYPE_NEWDATE
            | MYSQL_TYPE_DATETIME2
            | MYSQL_TYPE_TIMESTAMP2
            | MYSQL_TYPE_TIME2
    )
}

/// Byte ranges of a binary row's values: for length-prefixed types the
/// content without its prefix.
pub fn binary_values(
    p: &[u8],
    types: &[ColumnType],
) -> Result<Vec<Option<Range<usize>>>, ProtocolError> {
    let bitmap = (types.len() + 7 + 2) / 8;
    if p.first() != Some(&0x00) || p.len() < 1 + bitmap {
        return Err(bad_row());
    }
    let nulls = &p[1..=bitmap];
    let mut at = 1 + bitmap;
    let mut out = Vec::with_capacity(types.len());
    for (i, &t) in types.iter().enumerate() {
        let bit = i + 2;
        if nulls[bit / 8] & (1 << (bit % 8)) != 0 {
            out.push(None);
            continue;
        }
        let (start, len) = if let Some(w) = fixed_width(t)? {
            (at, w)
        } else if is_temporal(t) {
            let len = *p.get(at).ok_or_else(bad_row)? as usize;
            (at + 1, len)
        } else {
            let mut b = ParseBuf(p.get(at..).ok_or_else(bad_row)?);
            let before = b.len();
            let len = b.checked_eat_lenenc_int().ok_or_else(bad_row)?;
            (
                at + (before - b.len()),
                usize::try_from(len).map_err(|_| bad_row())?,
            )
        };
        let end = start
            .checked_add(len)
            .filter(|&e| e <= p.len())
            .ok_or_else(bad_row)?;
        out.push(Some(start..end));
        at = end;
    }
    if at != p.len() {
        return Err(bad_row());
    }
    Ok(out)
}

/// The parameter types of a `COM_STMT_EXECUTE` (type, unsigned), as the
/// client last sent them for the statement.
pub type ParamTypes = Vec<(ColumnType, bool)>;

/// The values bound by a `COM_STMT_EXECUTE` payload (command byte first)
/// for a statement of `count` parameters: each value's bytes (strings as
/// sent, integers as decimal text, anything else in its binary encoding),
/// `None` for NULL. `types`: the types the client sent last for this
/// statement; replaced when this execution sends new ones. `Err`: the
/// values cannot be read (types never sent, lengths that do not add up);
/// the caller then treats every value as unknown.
pub fn execute_params(
    payload: &[u8],
    count: usize,
    types: &mut Option<ParamTypes>,
) -> Result<Vec<Option<Vec<u8>>>, ProtocolError> {
    // 0x17, statement id (4), flags (1), iteration count (4).
    const HEAD: usize = 10;
    if count == 0 {
        return Ok(Vec::new());
    }
    let bitmap = count.div_ceil(8);
    let nulls = payload.get(HEAD..HEAD + bitmap).ok_or_else(bad_row)?;
    let mut at = HEAD + bitmap;
    let bound = *payload.get(at).ok_or_else(bad_row)?;
    at += 1;
    if bound == 1 {
        let raw = payload.get(at..at + 2 * count).ok_or_else(bad_row)?;
        let parsed = raw
            .chunks_exact(2)
            .map(|t| {
                ColumnType::try_from(t[0])
                    .map(|ty| (ty, t[1] & 0x80 != 0))
                    .map_err(|_| bad_row())
            })
            .collect::<Result<ParamTypes, _>>()?;
        *types = Some(parsed);
        at += 2 * count;
    }
    let ts = types
        .as_ref()
        .filter(|t| t.len() == count)
        .ok_or_else(bad_row)?;
    let mut out = Vec::with_capacity(count);
    for (i, &(t, unsigned)) in ts.iter().enumerate() {
        if nulls[i / 8] & (1 << (i % 8)) != 0 {
            out.push(None);
            continue;
        }
        let (start, len) = if let Some(w) = fixed_width(t)? {
            (at, w)
        } else if is_temporal(t) {
            (at + 1, *payload.get(at).ok_or_else(bad_row)? as usize)
        } else {
            let mut b = ParseBuf(payload.get(at..).ok_or_else(bad_row)?);
            let before = b.len();
            let len = b.checked_eat_lenenc_int().ok_or_else(bad_row)?;
            (
                at + (before - b.len()),
                usize::try_from(len).map_err(|_| bad_row())?,
            )
        };
        let end = start
            .checked_add(len)
            .filter(|&e| e <= payload.len())
            .ok_or_else(bad_row)?;
        let v = &payload[start..end];
        let int = |v: &[u8]| -> Option<String> {
            let mut b = [0u8; 8];
            b[..v.len()].copy_from_slice(v);
            let u = u64::from_le_bytes(b);
            if unsigned {
                return Some(u.to_string());
            }
            let shift = 64 - 8 * v.len() as u32;
            #[allow(clippy::cast_possible_wrap)] // sign extension, on purpose
            let i = ((u << shift) as i64) >> shift;
            Some(i.to_string())
        };
        let value = match t {
            ColumnType::MYSQL_TYPE_TINY
            | ColumnType::MYSQL_TYPE_SHORT
            | ColumnType::MYSQL_TYPE_INT24
            | ColumnType::MYSQL_TYPE_LONG
            | ColumnType::MYSQL_TYPE_LONGLONG
            | ColumnType::MYSQL_TYPE_YEAR => int(v).map_or_else(|| v.to_vec(), String::into_bytes),
            _ => v.to_vec(),
        };
        out.push(Some(value));
        at = end;
    }
    Ok(out)
}

fn put_lenenc(out: &mut Vec<u8>, n: usize) {
    let n = n as u64;
    if n < 251 {
        out.push(n as u8);
    } else if n < 1 << 16 {
        out.push(0xFC);
        out.put_u16_le(n as u16);
    } else if n < 1 << 24 {
        out.push(0xFD);
        out.put_uint_le(n, 3);
    } else {
        out.push(0xFE);
        out.put_u64_le(n);
    }
}

/// Rewrites a row: `edit(i, value)` says what becomes of each value
/// (`None`: NULL). `types`: `Some` for a binary row. Returns `None` when
/// nothing changed (the row goes on as it came).
pub fn rewrite(
    p: &[u8],
    types: &[ColumnType],
    binary: bool,
    mut edit: impl FnMut(usize, Option<&[u8]>) -> Edit,
) -> Result<Option<Vec<u8>>, ProtocolError> {
    let ranges = if binary {
        binary_values(p, types)?
    } else {
        text_values(p, types.len())?
    };
    let edits: Vec<Edit> = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| edit(i, r.clone().map(|r| &p[r])))
        .collect();
    if edits.iter().all(|e| *e == Edit::Keep) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(p.len());
    if binary {
        let bitmap = (types.len() + 7 + 2) / 8;
        out.push(0x00);
        let mut nulls = p[1..=bitmap].to_vec();
        for (i, e) in edits.iter().enumerate() {
            if *e == Edit::Null {
                let bit = i + 2;
                nulls[bit / 8] |= 1 << (bit % 8);
            }
        }
        out.extend_from_slice(&nulls);
        for (i, (r, e)) in ranges.iter().zip(&edits).enumerate() {
            let Some(r) = r else { continue };
            match e {
                Edit::Null => {}
                Edit::Text(s) if is_textual(types[i]) => {
                    put_lenenc(&mut out, s.len());
                    out.extend_from_slice(s.as_bytes());
                }
                Edit::Text(_) => return Err(bad_row()),
                Edit::Keep => {
                    let t = types[i];
                    if fixed_width(t)?.is_some() {
                        out.extend_from_slice(&p[r.clone()]);
                    } else if is_temporal(t) {
                        out.push(r.len() as u8);
                        out.extend_from_slice(&p[r.clone()]);
                    } else {
                        put_lenenc(&mut out, r.len());
                        out.extend_from_slice(&p[r.clone()]);
                    }
                }
            }
        }
    } else {
        for (r, e) in ranges.iter().zip(&edits) {
            let value: Option<Cow<'_, [u8]>> = match (e, r) {
                (Edit::Null, _) | (Edit::Keep, None) => None,
                (Edit::Keep, Some(r)) => Some(Cow::Borrowed(&p[r.clone()])),
                (Edit::Text(s), _) => Some(Cow::Borrowed(s.as_bytes())),
            };
            match value {
                None => out.push(0xFB),
                Some(v) => {
                    put_lenenc(&mut out, v.len());
                    out.extend_from_slice(&v);
                }
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColumnType::{MYSQL_TYPE_DATETIME, MYSQL_TYPE_LONG, MYSQL_TYPE_VAR_STRING};

    #[test]
    fn text_rows_are_read_and_rewritten() {
        let row = b"\x01\x31\xfb\x0b123-45-6789";
        let types = [
            MYSQL_TYPE_LONG,
            MYSQL_TYPE_VAR_STRING,
            MYSQL_TYPE_VAR_STRING,
        ];
        let v = text_values(row, 3).unwrap();
        assert_eq!(v, vec![Some(1..2), None, Some(4..15)]);
        let out = rewrite(row, &types, false, |i, _| {
            if i == 2 {
                Edit::Text("***-**-6789".into())
            } else {
                Edit::Keep
            }
        })
        .unwrap()
        .unwrap();
        assert_eq!(out, b"\x01\x31\xfb\x0b***-**-6789");
        assert!(
            rewrite(row, &types, false, |_, _| Edit::Keep)
                .unwrap()
                .is_none()
        );
        // Lengths that do not add up: an error, not a guess.
        assert!(text_values(b"\x05ab", 1).is_err());
        assert!(text_values(b"\x01a\x01b", 1).is_err());
        assert!(text_values(b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff", 1).is_err());
    }

    #[test]
    fn execute_parameters_are_read_with_sent_or_remembered_types() {
        // Three parameters: a string, a signed tiny -2, NULL.
        let mut p = vec![0x17, 1, 0, 0, 0, 0, 1, 0, 0, 0];
        p.push(0b100); // NULL bitmap: the third
        p.push(1); // new types follow
        p.extend([ColumnType::MYSQL_TYPE_VAR_STRING as u8, 0]);
        p.extend([ColumnType::MYSQL_TYPE_TINY as u8, 0]);
        p.extend([ColumnType::MYSQL_TYPE_NULL as u8, 0]);
        p.push(11);
        p.extend(b"483-27-9150");
        p.push(0xFE);
        let mut types = None;
        let v = execute_params(&p, 3, &mut types).unwrap();
        assert_eq!(
            v,
            [Some(b"483-27-9150".to_vec()), Some(b"-2".to_vec()), None]
        );
        // Next execution without types: the remembered ones apply.
        let mut q = vec![0x17, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0b000, 0, 3];
        q.extend(b"abc");
        q.push(7);
        assert_eq!(
            execute_params(&q, 3, &mut types).unwrap(),
            [Some(b"abc".to_vec()), Some(b"7".to_vec()), Some(Vec::new())]
        );
        // Types never sent, or lengths that do not add up: not readable.
        assert!(execute_params(&q, 3, &mut None).is_err());
        assert!(execute_params(&p[..p.len() - 3], 3, &mut None).is_err());
    }

    #[test]
    fn binary_rows_are_read_and_rewritten() {
        // id INT = 7, ssn VARCHAR = "123-45-6789", ts DATETIME NULL
        let types = [MYSQL_TYPE_LONG, MYSQL_TYPE_VAR_STRING, MYSQL_TYPE_DATETIME];
        let mut row = vec![0x00, 0b0001_0000];
        row.extend_from_slice(&7i32.to_le_bytes());
        row.push(11);
        row.extend_from_slice(b"123-45-6789");
        let v = binary_values(&row, &types).unwrap();
        assert_eq!(v, vec![Some(2..6), Some(7..18), None]);
        let out = rewrite(&row, &types, true, |i, _| match i {
            0 => Edit::Null,
            1 => Edit::Text("xxx".into()),
            _ => Edit::Keep,
        })
        .unwrap()
        .unwrap();
        assert_eq!(out, vec![0x00, 0b0001_0100, 3, b'x', b'x', b'x']);
        assert!(binary_values(&row[..10], &types).is_err());
        assert!(binary_values(&[0x01, 0], &types).is_err());
    }
}
