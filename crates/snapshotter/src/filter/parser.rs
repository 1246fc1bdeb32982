//! Turns the scanner's tokens into selectors, with containerd's error
//! messages. Iterative: a filter is a flat list of selectors, so nothing here
//! recurses and the input's shape cannot exhaust the stack.

use super::scanner::{Rune, Scanner, Token};
use super::{FilterError, MAX_SELECTORS, Operator, Selector};
#[derive(Debug)]
pub(super) struct Parser<'a> {
    input: &'a str,
    scanner: Scanner<'a>,
}

impl<'a> Parser<'a> {
    pub(super) fn new(input: &'a str) -> Self {
        Parser {
            input,
            scanner: Scanner::new(input),
        }
    }

    pub(super) fn error(&self, position: usize, message: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_owned(),
            position,
            message: message.into(),
        }
    }

    fn scanner_error(&self, position: usize) -> FilterError {
        self.error(position, self.scanner.err.unwrap_or("illegal input"))
    }

    pub(super) fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut selectors = vec![self.selector()?];
        loop {
            match self.scanner.peek() {
                Rune::Eof => return Ok(selectors),
                Rune::Char(',') => {
                    let (pos, token, _) = self.scanner.scan();
                    if token != Token::Separator {
                        return Err(self.error(pos, "expected a separator"));
                    }
                    if selectors.len() >= MAX_SELECTORS {
                        return Err(self.error(
                            pos,
                            format!("more than {MAX_SELECTORS} selectors in one filter"),
                        ));
                    }
                    selectors.push(self.selector()?);
                }
                Rune::Char(c) => {
                    return Err(self.error(self.scanner.ppos, format!("unexpected input: {c}")));
                }
                Rune::Illegal => {
                    let pos = self.scanner.ppos;
                    return Err(self.scanner_error(pos));
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let fieldpath = self.fieldpath()?;
        if matches!(self.scanner.peek(), Rune::Char(',') | Rune::Eof) {
            return Ok(Selector {
                fieldpath,
                operator: Operator::Present,
                value: Vec::new(),
                value_pos: 0,
                regex: None,
            });
        }
        let operator = self.operator()?;
        let (value_pos, value) = self.value(operator == Operator::Matches)?;
        Ok(Selector {
            fieldpath,
            operator,
            value,
            value_pos,
            regex: None,
        })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut fields = vec![self.field()?];
        while self.scanner.peek() == Rune::Char('.') {
            let (pos, token, _) = self.scanner.scan();
            if token != Token::Separator {
                return Err(self.error(pos, "expected a field separator (`.`)"));
            }
            fields.push(self.field()?);
        }
        Ok(fields)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Field => Ok(text.to_owned()),
            Token::Quoted => {
                let bytes = self.unquote(pos, text, false)?;
                Ok(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
            Token::Illegal => Err(self.scanner_error(pos)),
            _ => Err(self.error(pos, "expected field or quoted")),
        }
    }

    fn operator(&mut self) -> Result<Operator, FilterError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Operator => match text {
                "==" => Ok(Operator::Equal),
                "!=" => Ok(Operator::NotEqual),
                "~=" => Ok(Operator::Matches),
                _ => Err(self.error(pos, format!("unsupported operator \"{text}\""))),
            },
            Token::Illegal => Err(self.scanner_error(pos)),
            _ => Err(self.error(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        }
    }

    fn value(&mut self, allow_alt_quotes: bool) -> Result<(usize, Vec<u8>), FilterError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Value | Token::Field => Ok((pos, text.as_bytes().to_vec())),
            Token::Quoted => Ok((pos, self.unquote(pos, text, allow_alt_quotes)?)),
            Token::Illegal => Err(self.scanner_error(pos)),
            _ => Err(self.error(pos, "expected value or quoted")),
        }
    }

    fn unquote(
        &self,
        pos: usize,
        text: &str,
        allow_alt_quotes: bool,
    ) -> Result<Vec<u8>, FilterError> {
        if !allow_alt_quotes && !text.starts_with('"') {
            return Err(self.error(pos, "invalid quote encountered"));
        }
        unquote(text).ok_or_else(|| self.error(pos, "unquoting failed: quote syntax error"))
    }
}

/// Decodes a quoted literal (delimiters included) with Go's string escapes,
/// where the delimiter is `"`, `/` or `|`. Returns bytes: `\xHH` and octal
/// escapes produce single bytes that need not form UTF-8.
fn unquote(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let (&quote, rest) = bytes.split_first()?;
    let (&last, inner) = rest.split_last()?;
    if last != quote || !matches!(quote, b'"' | b'/' | b'|') || inner.contains(&b'\n') {
        return None;
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        i += 1;
        if b == quote {
            return None;
        }
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let e = *inner.get(i)?;
        i += 1;
        match e {
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0C),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0B),
            b'\\' => out.push(b'\\'),
            b'x' | b'u' | b'U' => {
                let n = match e {
                    b'x' => 2,
                    b'u' => 4,
                    _ => 8,
                };
                let digits = inner.get(i..i + n)?;
                i += n;
                let mut v: u32 = 0;
                for &d in digits {
                    v = (v << 4) | char::from(d).to_digit(16)?;
                }
                if e == b'x' {
                    out.push(v as u8);
                } else {
                    if v > 0x10FFFF {
                        return None;
                    }
                    // Go encodes surrogate halves as U+FFFD.
                    let c = char::from_u32(v).unwrap_or('\u{FFFD}');
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
            }
            b'0'..=b'7' => {
                let digits = inner.get(i..i + 2)?;
                i += 2;
                let mut v = u32::from(e - b'0');
                for &d in digits {
                    if !(b'0'..=b'7').contains(&d) {
                        return None;
                    }
                    v = (v << 3) | u32::from(d - b'0');
                }
                out.push(u8::try_from(v).ok()?);
            }
            b'\'' | b'"' | b'|' | b'/' if e == quote => out.push(e),
            _ => return None,
        }
    }
    Some(out)
}
