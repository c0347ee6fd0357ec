//! Literal-free SQL for the audit log.
//!
//! Two passes, both over parsed structure: the AST pass replaces every literal
//! value node with the placeholder `?`, the statements are re-serialized
//! (which drops comments), and a token pass over that serialization replaces any
//! literal that lives outside an expression node (passwords in `CREATE ROLE`,
//! `COMMENT ON ... IS '...'`, `COPY ... TO 'file'`, ...). Text that is too long
//! or does not parse is never passed through: it becomes `<unparsed: N bytes>`.

use std::ops::ControlFlow;

use sqlparser::{
    ast::{Statement, Value, ValueWithSpan, VisitMut, VisitorMut},
    tokenizer::{Token, Tokenizer, Whitespace},
};

use super::{
    Dialect, MAX_SQL_LEN, SqlError,
    classify::{Piece, cursor_move_pieces},
};

const PLACEHOLDER: &str = "?";

struct LiteralEraser;

impl VisitorMut for LiteralEraser {
    type Break = ();

    fn pre_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
        if !matches!(value.value, Value::Placeholder(_)) {
            value.value = Value::Placeholder(PLACEHOLDER.to_owned());
        }
        ControlFlow::Continue(())
    }
}

/// Replace every literal in `sql` with `?` and drop comments.
///
/// Returns `Err` only to say *why* the text was replaced wholesale; callers that
/// just want something safe to log use [`redact_for_log`].
pub fn redact_literals(sql: &str, dialect: Dialect) -> Result<String, SqlError> {
    if sql.len() > MAX_SQL_LEN {
        return Err(SqlError::TooLong {
            len: sql.len(),
            max: MAX_SQL_LEN,
        });
    }
    let d = dialect.parser_dialect();
    let rendered = match sqlparser::parser::Parser::parse_sql(d, sql) {
        Ok(statements) => erase_and_render(statements),
        // Cursor moves the parser does not know: rendered from their tokens
        // (a count is a literal, replaced below).
        Err(source) => cursor_move_pieces(sql, dialect)
            .ok_or(SqlError::Parse { source })?
            .into_iter()
            .map(|piece| match piece {
                Piece::CursorMove(tokens) => tokens
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                Piece::Parsed(statements) => erase_and_render(statements),
            })
            .collect::<Vec<_>>()
            .join("; "),
    };
    // Token pass over our own rendering: it was produced by the same dialect's
    // printer, so it tokenizes; if it somehow does not, fail closed.
    let tokens = Tokenizer::new(d, &rendered)
        .tokenize()
        .map_err(|e| SqlError::Parse {
            source: sqlparser::parser::ParserError::TokenizerError(e.to_string()),
        })?;
    let mut out = String::with_capacity(rendered.len());
    for tok in tokens {
        if is_literal(&tok, dialect) {
            out.push_str(PLACEHOLDER);
        } else {
            match tok {
                Token::Whitespace(
                    Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_),
                ) => {
                    out.push(' ');
                }
                other => out.push_str(&other.to_string()),
            }
        }
    }
    Ok(out)
}

/// The statements with every literal value node replaced, printed and joined.
fn erase_and_render(mut statements: Vec<Statement>) -> String {
    let _ = statements.visit(&mut LiteralEraser);
    statements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// [`redact_literals`], or `<unparsed: N bytes>` when the text cannot be redacted.
pub fn redact_for_log(sql: &str, dialect: Dialect) -> String {
    redact_literals(sql, dialect).unwrap_or_else(|_| format!("<unparsed: {} bytes>", sql.len()))
}

pub(super) fn is_literal(tok: &Token, dialect: Dialect) -> bool {
    match tok {
        Token::Number(..)
        | Token::SingleQuotedString(_)
        | Token::TripleSingleQuotedString(_)
        | Token::TripleDoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::SingleQuotedByteStringLiteral(_)
        | Token::DoubleQuotedByteStringLiteral(_)
        | Token::TripleSingleQuotedByteStringLiteral(_)
        | Token::TripleDoubleQuotedByteStringLiteral(_)
        | Token::SingleQuotedRawStringLiteral(_)
        | Token::DoubleQuotedRawStringLiteral(_)
        | Token::TripleSingleQuotedRawStringLiteral(_)
        | Token::TripleDoubleQuotedRawStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::QuoteDelimitedStringLiteral(_)
        | Token::NationalQuoteDelimitedStringLiteral(_) => true,
        // In MySQL (without ANSI_QUOTES) "..." is a string, not an identifier.
        Token::DoubleQuotedString(_) => dialect == Dialect::MySql,
        _ => false,
    }
}
