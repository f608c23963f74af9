//! A minimal, zero-copy MessagePack reader and writer for the shapes vLLM sends.
//!
//! The reader never allocates: strings and binaries are borrowed from the input, and a
//! length header is only ever trusted up to the bytes that remain (every element takes at
//! least one byte), so a header that claims 2^32 elements fails fast instead of reserving
//! memory. Skipping an unknown value is iterative, with a bounded nesting depth.

use std::fmt;

/// What went wrong while reading one MessagePack value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The input ended inside a value.
    Eof,
    /// A value of another type was found.
    Type {
        expected: &'static str,
        found: &'static str,
    },
    /// An integer does not fit the target type.
    Range { expected: &'static str, value: i128 },
    /// A string is not valid UTF-8.
    Utf8,
    /// A length header claims more elements or bytes than the input holds.
    Length { claimed: u64, remaining: usize },
    /// Nested containers deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A byte that is not a MessagePack marker (0xc1).
    Reserved,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Eof => write!(f, "unexpected end of input"),
            ReadError::Type { expected, found } => write!(f, "expected {expected}, found {found}"),
            ReadError::Range { expected, value } => {
                write!(f, "integer {value} out of range for {expected}")
            }
            ReadError::Utf8 => write!(f, "string is not valid UTF-8"),
            ReadError::Length { claimed, remaining } => write!(
                f,
                "length header claims {claimed} but only {remaining} bytes remain"
            ),
            ReadError::TooDeep => write!(f, "values nested deeper than {MAX_DEPTH}"),
            ReadError::Reserved => write!(f, "reserved marker 0xc1"),
        }
    }
}

/// Deepest nesting that [`Reader::skip`] follows.
pub const MAX_DEPTH: usize = 64;

/// An integer as MessagePack carries it: non-negative values are `Uint`, negative `Int`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int {
    Uint(u64),
    /// Always negative.
    Int(i64),
}

/// The name of the MessagePack type a marker byte starts.
pub fn marker_name(m: u8) -> &'static str {
    match m {
        0x00..=0x7f | 0xcc..=0xcf => "unsigned int",
        0xe0..=0xff | 0xd0..=0xd3 => "int",
        0x80..=0x8f | 0xde | 0xdf => "map",
        0x90..=0x9f | 0xdc | 0xdd => "array",
        0xa0..=0xbf | 0xd9..=0xdb => "str",
        0xc0 => "nil",
        0xc1 => "reserved",
        0xc2 | 0xc3 => "bool",
        0xc4..=0xc6 => "bin",
        0xc7..=0xc9 | 0xd4..=0xd8 => "ext",
        0xca | 0xcb => "float",
    }
}

/// A cursor over one MessagePack buffer.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

macro_rules! be {
    ($self:ident, $t:ty, $n:expr) => {{
        let b = $self.take($n)?;
        let mut a = [0u8; $n];
        a.copy_from_slice(b);
        <$t>::from_be_bytes(a)
    }};
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Byte offset of the next value.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The bytes from `start` to the cursor.
    pub fn since(&self, start: usize) -> &'a [u8] {
        &self.buf[start..self.pos]
    }

    #[inline]
    pub fn peek(&self) -> Result<u8, ReadError> {
        self.buf.get(self.pos).copied().ok_or(ReadError::Eof)
    }

    #[inline]
    fn next(&mut self) -> Result<u8, ReadError> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        let end = self.pos.checked_add(n).ok_or(ReadError::Eof)?;
        let s = self.buf.get(self.pos..end).ok_or(ReadError::Eof)?;
        self.pos = end;
        Ok(s)
    }

    fn type_err<T>(&self, expected: &'static str, m: u8) -> Result<T, ReadError> {
        Err(ReadError::Type {
            expected,
            found: marker_name(m),
        })
    }

    /// Checks that `n` elements of at least `min_size` bytes each can still follow.
    fn check_len(&self, n: u64, min_size: usize) -> Result<usize, ReadError> {
        let remaining = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_size) <= remaining => Ok(n),
            _ => Err(ReadError::Length {
                claimed: n,
                remaining,
            }),
        }
    }

    /// Consumes a nil if one is next; returns whether it did.
    #[inline]
    pub fn nil(&mut self) -> Result<bool, ReadError> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// An array header; the length is checked against the bytes left.
    #[inline]
    pub fn array_len(&mut self) -> Result<usize, ReadError> {
        let m = self.next()?;
        let n = match m {
            0x90..=0x9f => u64::from(m & 0x0f),
            0xdc => u64::from(be!(self, u16, 2)),
            0xdd => u64::from(be!(self, u32, 4)),
            _ => {
                self.pos -= 1;
                return self.type_err("array", m);
            }
        };
        self.check_len(n, 1)
    }

    /// A map header; the length is checked against the bytes left.
    #[inline]
    pub fn map_len(&mut self) -> Result<usize, ReadError> {
        let m = self.next()?;
        let n = match m {
            0x80..=0x8f => u64::from(m & 0x0f),
            0xde => u64::from(be!(self, u16, 2)),
            0xdf => u64::from(be!(self, u32, 4)),
            _ => {
                self.pos -= 1;
                return self.type_err("map", m);
            }
        };
        self.check_len(n, 2)
    }

    /// Any integer, of any width.
    #[inline]
    pub fn int(&mut self) -> Result<Int, ReadError> {
        let m = self.next()?;
        let v = match m {
            0x00..=0x7f => Int::Uint(u64::from(m)),
            0xe0..=0xff => Int::Int(i64::from(m as i8)),
            0xcc => Int::Uint(u64::from(self.next()?)),
            0xcd => Int::Uint(u64::from(be!(self, u16, 2))),
            0xce => Int::Uint(u64::from(be!(self, u32, 4))),
            0xcf => Int::Uint(be!(self, u64, 8)),
            0xd0 => signed(i64::from(self.next()? as i8)),
            0xd1 => signed(i64::from(be!(self, i16, 2))),
            0xd2 => signed(i64::from(be!(self, i32, 4))),
            0xd3 => signed(be!(self, i64, 8)),
            _ => {
                self.pos -= 1;
                return self.type_err("int", m);
            }
        };
        Ok(v)
    }

    /// A non-negative integer that fits in a `u64`.
    #[inline]
    pub fn u64(&mut self) -> Result<u64, ReadError> {
        match self.int() {
            Ok(Int::Uint(v)) => Ok(v),
            Err(ReadError::Type { found, .. }) => Err(ReadError::Type {
                expected: "unsigned int",
                found,
            }),
            Err(e) => Err(e),
            Ok(Int::Int(v)) => Err(ReadError::Range {
                expected: "unsigned int",
                value: i128::from(v),
            }),
        }
    }

    /// A non-negative integer that fits in a `u32`.
    #[inline]
    pub fn u32(&mut self) -> Result<u32, ReadError> {
        // Fast path for the widths token ids use.
        let m = self.peek()?;
        match m {
            0x00..=0x7f => {
                self.pos += 1;
                Ok(u32::from(m))
            }
            0xcd => {
                self.pos += 1;
                Ok(u32::from(be!(self, u16, 2)))
            }
            0xce => {
                self.pos += 1;
                Ok(be!(self, u32, 4))
            }
            _ => {
                let v = self.u64()?;
                u32::try_from(v).map_err(|_| ReadError::Range {
                    expected: "u32",
                    value: i128::from(v),
                })
            }
        }
    }

    /// Any signed integer that fits in an `i64`.
    pub fn i64(&mut self) -> Result<i64, ReadError> {
        match self.int()? {
            Int::Int(v) => Ok(v),
            Int::Uint(v) => i64::try_from(v).map_err(|_| ReadError::Range {
                expected: "i64",
                value: i128::from(v),
            }),
        }
    }

    /// A float of either width, or an integer (read as a float).
    pub fn f64(&mut self) -> Result<f64, ReadError> {
        let m = self.peek()?;
        match m {
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_bits(be!(self, u32, 4))))
            }
            0xcb => {
                self.pos += 1;
                Ok(f64::from_bits(be!(self, u64, 8)))
            }
            _ => match self.int() {
                Ok(Int::Uint(v)) => Ok(v as f64),
                Ok(Int::Int(v)) => Ok(v as f64),
                Err(ReadError::Type { found, .. }) => Err(ReadError::Type {
                    expected: "float",
                    found,
                }),
                Err(e) => Err(e),
            },
        }
    }

    /// A string, borrowed from the input.
    #[inline]
    pub fn str(&mut self) -> Result<&'a str, ReadError> {
        let b = self.str_bytes()?;
        std::str::from_utf8(b).map_err(|_| ReadError::Utf8)
    }

    /// A string's bytes, not checked for UTF-8: for comparing with known ASCII names (a match
    /// is valid UTF-8 by construction; the caller checks what it keeps otherwise).
    pub fn str_bytes(&mut self) -> Result<&'a [u8], ReadError> {
        let m = self.next()?;
        let n = match m {
            0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => usize::from(self.next()?),
            0xda => usize::from(be!(self, u16, 2)),
            0xdb => be!(self, u32, 4) as usize,
            _ => {
                self.pos -= 1;
                return self.type_err("str", m);
            }
        };
        self.take(n)
    }

    /// A binary, borrowed from the input.
    pub fn bin(&mut self) -> Result<&'a [u8], ReadError> {
        let m = self.next()?;
        let n = match m {
            0xc4 => usize::from(self.next()?),
            0xc5 => usize::from(be!(self, u16, 2)),
            0xc6 => be!(self, u32, 4) as usize,
            _ => {
                self.pos -= 1;
                return self.type_err("bin", m);
            }
        };
        self.take(n)
    }

    /// Skips one value of any type, however nested (up to [`MAX_DEPTH`]).
    pub fn skip(&mut self) -> Result<(), ReadError> {
        // Number of values still to skip at each open level.
        let mut pending: [u64; MAX_DEPTH] = [0; MAX_DEPTH];
        let mut depth = 0usize;
        pending[0] = 1;
        loop {
            if pending[depth] == 0 {
                if depth == 0 {
                    return Ok(());
                }
                depth -= 1;
                continue;
            }
            pending[depth] -= 1;
            let m = self.next()?;
            let children: u64 = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                0xc1 => return Err(ReadError::Reserved),
                0xcc | 0xd0 => self.skip_bytes(1)?,
                0xcd | 0xd1 => self.skip_bytes(2)?,
                0xce | 0xd2 | 0xca => self.skip_bytes(4)?,
                0xcf | 0xd3 | 0xcb => self.skip_bytes(8)?,
                0xa0..=0xbf => self.skip_bytes(usize::from(m & 0x1f))?,
                0xd9 | 0xc4 => {
                    let n = usize::from(self.next()?);
                    self.skip_bytes(n)?
                }
                0xda | 0xc5 => {
                    let n = usize::from(be!(self, u16, 2));
                    self.skip_bytes(n)?
                }
                0xdb | 0xc6 => {
                    let n = be!(self, u32, 4) as usize;
                    self.skip_bytes(n)?
                }
                0xd4 => self.skip_bytes(2)?,
                0xd5 => self.skip_bytes(3)?,
                0xd6 => self.skip_bytes(5)?,
                0xd7 => self.skip_bytes(9)?,
                0xd8 => self.skip_bytes(17)?,
                0xc7 => {
                    let n = usize::from(self.next()?);
                    self.skip_bytes(n + 1)?
                }
                0xc8 => {
                    let n = usize::from(be!(self, u16, 2));
                    self.skip_bytes(n + 1)?
                }
                0xc9 => {
                    let n = be!(self, u32, 4) as usize;
                    self.skip_bytes(n.saturating_add(1))?
                }
                0x90..=0x9f | 0xdc | 0xdd => {
                    self.pos -= 1;
                    self.array_len()? as u64
                }
                0x80..=0x8f | 0xde | 0xdf => {
                    self.pos -= 1;
                    2 * self.map_len()? as u64
                }
            };
            if children > 0 {
                depth += 1;
                if depth >= MAX_DEPTH {
                    return Err(ReadError::TooDeep);
                }
                pending[depth] = children;
            }
        }
    }

    fn skip_bytes(&mut self, n: usize) -> Result<u64, ReadError> {
        self.take(n)?;
        Ok(0)
    }
}

#[inline]
fn signed(v: i64) -> Int {
    if v < 0 {
        Int::Int(v)
    } else {
        Int::Uint(v as u64)
    }
}

/// MessagePack writing, choosing the smallest encoding as msgspec does.
pub mod write {
    pub fn nil(out: &mut Vec<u8>) {
        out.push(0xc0);
    }

    pub fn uint(out: &mut Vec<u8>, v: u64) {
        if v < 0x80 {
            out.push(v as u8);
        } else if v <= u64::from(u8::MAX) {
            out.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= u64::from(u16::MAX) {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u64::from(u32::MAX) {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// A signed integer: non-negative values use the unsigned family, as msgspec does.
    pub fn int(out: &mut Vec<u8>, v: i64) {
        if v >= 0 {
            uint(out, v as u64);
        } else if v >= -32 {
            out.push(v as i8 as u8);
        } else if v >= i64::from(i8::MIN) {
            out.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i64::from(i16::MIN) {
            out.push(0xd1);
            out.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i64::from(i32::MIN) {
            out.push(0xd2);
            out.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            out.push(0xd3);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub fn f64(out: &mut Vec<u8>, v: f64) {
        out.push(0xcb);
        out.extend_from_slice(&v.to_bits().to_be_bytes());
    }

    pub fn str(out: &mut Vec<u8>, s: &str) {
        let n = s.len();
        if n < 32 {
            out.push(0xa0 | n as u8);
        } else if n <= usize::from(u8::MAX) {
            out.extend_from_slice(&[0xd9, n as u8]);
        } else if n <= usize::from(u16::MAX) {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xdb);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        out.extend_from_slice(s.as_bytes());
    }

    pub fn bin(out: &mut Vec<u8>, b: &[u8]) {
        let n = b.len();
        if n <= usize::from(u8::MAX) {
            out.extend_from_slice(&[0xc4, n as u8]);
        } else if n <= usize::from(u16::MAX) {
            out.push(0xc5);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xc6);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        out.extend_from_slice(b);
    }

    /// An array header; `at_least_16` forces the 16-bit form, as msgspec does for structs
    /// that could hold more than 15 fields.
    pub fn array_len(out: &mut Vec<u8>, n: usize, at_least_16: bool) {
        header(out, n, at_least_16, 0x90, 0xdc, 0xdd);
    }

    /// A map header; see [`array_len`].
    pub fn map_len(out: &mut Vec<u8>, n: usize, at_least_16: bool) {
        header(out, n, at_least_16, 0x80, 0xde, 0xdf);
    }

    fn header(out: &mut Vec<u8>, n: usize, at_least_16: bool, fix: u8, m16: u8, m32: u8) {
        if n < 16 && !at_least_16 {
            out.push(fix | n as u8);
        } else if n <= usize::from(u16::MAX) {
            out.push(m16);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(m32);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_of_every_width_round_trip() {
        for v in [
            0i64,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u32::MAX as i64,
            u32::MAX as i64 + 1,
            i64::MAX,
            -1,
            -32,
            -33,
            -128,
            -129,
            -32768,
            -32769,
            i32::MIN as i64,
            i32::MIN as i64 - 1,
            i64::MIN,
        ] {
            let mut out = Vec::new();
            write::int(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.i64(), Ok(v), "{v} as {out:02x?}");
            assert!(r.is_empty());
        }
        let mut out = Vec::new();
        write::uint(&mut out, u64::MAX);
        assert_eq!(Reader::new(&out).u64(), Ok(u64::MAX));
        assert_eq!(
            Reader::new(&out).i64(),
            Err(ReadError::Range {
                expected: "i64",
                value: u64::MAX as i128
            })
        );
    }

    #[test]
    fn signed_markers_holding_positive_values_read_as_unsigned() {
        // int8 0x05: a non-minimal but valid encoding of 5.
        assert_eq!(Reader::new(&[0xd0, 0x05]).u32(), Ok(5));
        assert_eq!(Reader::new(&[0xd3, 0, 0, 0, 0, 0, 0, 1, 0]).u32(), Ok(256));
        assert!(matches!(
            Reader::new(&[0xff]).u32(),
            Err(ReadError::Range { value: -1, .. })
        ));
    }

    #[test]
    fn huge_length_headers_fail_without_allocating() {
        let arr32 = [0xdd, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(
            Reader::new(&arr32).array_len(),
            Err(ReadError::Length {
                claimed: u32::MAX as u64,
                remaining: 1
            })
        );
        let map32 = [0xdf, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Reader::new(&map32).map_len(),
            Err(ReadError::Length { .. })
        ));
        let str32 = [0xdb, 0xff, 0xff, 0xff, 0xff, b'a'];
        assert_eq!(Reader::new(&str32).str(), Err(ReadError::Eof));
    }

    #[test]
    fn skip_handles_nesting_and_bounds_depth() {
        let mut v = Vec::new();
        write::array_len(&mut v, 2, false);
        write::map_len(&mut v, 1, true);
        write::str(&mut v, "k");
        write::bin(&mut v, &[1, 2, 3]);
        write::f64(&mut v, 1.5);
        v.push(0x07);
        let mut r = Reader::new(&v);
        r.skip().unwrap();
        assert_eq!(r.pos(), v.len() - 1);

        let deep = vec![0x91u8; MAX_DEPTH + 2];
        assert_eq!(Reader::new(&deep).skip(), Err(ReadError::TooDeep));
        assert_eq!(Reader::new(&[0xc1]).skip(), Err(ReadError::Reserved));
    }
}
