//! Splits a filter string into tokens, mirroring containerd's scanner state
//! machine (including where white space is and is not accepted).

/// A character read from the input, or one of the two conditions that stop
/// scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rune {
    Eof,
    Illegal,
    Char(char),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    Eof,
    Illegal,
    Quoted,
    Value,
    Field,
    Separator,
    Operator,
    /// A character that starts no token where it was found.
    Other,
}

#[derive(Debug)]
pub(super) struct Scanner<'a> {
    input: &'a str,
    /// Start of the character last read.
    pos: usize,
    /// End of the character last read.
    pub(super) ppos: usize,
    /// Whether the next bare word is a value (an operator was just read).
    value: bool,
    /// The first error met; later ones are not recorded.
    pub(super) err: Option<&'static str>,
}

impl<'a> Scanner<'a> {
    pub(super) fn new(input: &'a str) -> Self {
        Scanner {
            input,
            pos: 0,
            ppos: 0,
            value: false,
            err: None,
        }
    }

    pub(super) fn next(&mut self) -> Rune {
        // Checking `pos` (not `ppos`) leaves `pos` at the end of the input
        // once the end is reached, which is where the EOF token sits.
        if self.pos >= self.input.len() {
            return Rune::Eof;
        }
        self.pos = self.ppos;
        let Some(c) = self.input[self.ppos..].chars().next() else {
            return Rune::Eof;
        };
        self.ppos += c.len_utf8();
        if c == '\0' {
            self.error("unexpected null");
            return Rune::Illegal;
        }
        Rune::Char(c)
    }

    pub(super) fn peek(&mut self) -> Rune {
        let (pos, ppos) = (self.pos, self.ppos);
        let rune = self.next();
        self.pos = pos;
        self.ppos = ppos;
        rune
    }

    fn error(&mut self, msg: &'static str) {
        if self.err.is_none() {
            self.err = Some(msg);
        }
    }

    /// Returns the next token's position, kind and text.
    pub(super) fn scan(&mut self) -> (usize, Token, &'a str) {
        let mut ch = self.next();
        let mut pos = self.pos;
        while let Rune::Char(c) = ch {
            if is_quote_char(c) {
                let ok = self.scan_quoted(c);
                let token = if ok { Token::Quoted } else { Token::Illegal };
                return (pos, token, &self.input[pos..self.ppos]);
            }
            if is_separator_char(c) {
                self.value = false;
                return (pos, Token::Separator, &self.input[pos..self.ppos]);
            }
            if is_operator_char(c) {
                self.scan_while(is_operator_char);
                self.value = true;
                return (pos, Token::Operator, &self.input[pos..self.ppos]);
            }
            if c.is_whitespace() {
                ch = self.next();
                pos = self.pos;
                continue;
            }
            if self.value {
                self.scan_while(is_value_char);
                self.value = false;
                return (pos, Token::Value, &self.input[pos..self.ppos]);
            }
            if is_field_char(c) {
                self.scan_while(is_field_char);
                return (pos, Token::Field, &self.input[pos..self.ppos]);
            }
            break;
        }
        let token = match ch {
            Rune::Eof => Token::Eof,
            Rune::Illegal => Token::Illegal,
            Rune::Char(_) => Token::Other,
        };
        (self.pos, token, "")
    }

    fn scan_while(&mut self, accept: fn(char) -> bool) {
        while let Rune::Char(c) = self.peek() {
            if !accept(c) {
                break;
            }
            self.next();
        }
    }

    /// Reads up to and including the closing `quote`; false if the literal
    /// is unterminated or has a bad escape.
    fn scan_quoted(&mut self, quote: char) -> bool {
        let mut legal = true;
        let mut ch = self.next();
        loop {
            match ch {
                Rune::Char(c) if c == quote => return legal,
                Rune::Char('\n') | Rune::Eof | Rune::Illegal => {
                    self.error("quoted literal not terminated");
                    return false;
                }
                Rune::Char('\\') => {
                    let (next, ok) = self.scan_escape(quote);
                    legal &= ok;
                    ch = next;
                }
                Rune::Char(_) => ch = self.next(),
            }
        }
    }

    /// Reads an escape after its backslash; returns the character after it.
    fn scan_escape(&mut self, quote: char) -> (Rune, bool) {
        let ch = self.next();
        match ch {
            Rune::Char(c) if c == quote || "abfnrtv\\".contains(c) => (self.next(), true),
            Rune::Char('0'..='7') => self.scan_digits(ch, 8, 3),
            Rune::Char('x') => {
                let first = self.next();
                self.scan_digits(first, 16, 2)
            }
            Rune::Char('u') => {
                let first = self.next();
                self.scan_digits(first, 16, 4)
            }
            Rune::Char('U') => {
                let first = self.next();
                self.scan_digits(first, 16, 8)
            }
            _ => {
                self.error("illegal escape sequence");
                (ch, false)
            }
        }
    }

    fn scan_digits(&mut self, mut ch: Rune, base: u32, mut n: u32) -> (Rune, bool) {
        while n > 0 && digit_value(ch) < base {
            ch = self.next();
            n -= 1;
        }
        if n > 0 {
            self.error("illegal numeric escape sequence");
            return (ch, false);
        }
        (ch, true)
    }
}

fn digit_value(rune: Rune) -> u32 {
    match rune {
        Rune::Char(c) => c.to_digit(16).unwrap_or(16),
        _ => 16,
    }
}

fn is_field_char(c: char) -> bool {
    c == '-' || c == '_' || c.is_ascii_alphanumeric()
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote_char(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

fn is_separator_char(c: char) -> bool {
    matches!(c, ',' | '.')
}

/// Characters of an unquoted value: Go's `unicode.IsGraphic` minus `,` and
/// white space. Without Unicode tables, "graphic" is approximated as "not a
/// control, format, private-use or noncharacter code point".
fn is_value_char(c: char) -> bool {
    c != ','
        && !c.is_whitespace()
        && !c.is_control()
        && !is_format_char(c)
        && !is_private_or_nonchar(c)
}

/// Unicode general category Cf (format characters).
fn is_format_char(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Private-use code points (Co) and noncharacters (part of Cn).
fn is_private_or_nonchar(c: char) -> bool {
    let u = c as u32;
    matches!(u, 0xE000..=0xF8FF | 0xF0000..=0x10FFFF | 0xFDD0..=0xFDEF) || (u & 0xFFFE) == 0xFFFE
}

// ---------------------------------------------------------------------------
// Parser.
