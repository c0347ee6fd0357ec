//! SQL text → statement classes, referenced tables and functions, and a
//! literal-free rendering for the audit log.
//!
//! Everything here works from the `sqlparser` AST, never from regexes over the
//! text. The module fails closed: text that is too long, does not tokenize or
//! does not parse is classified [`StatementClass::Unknown`], the most dangerous
//! class, and [`redact_literals`] never passes unparsed text through.

mod analysis;
mod classify;
pub mod lineage;
pub mod mysql;
mod redact;

pub use analysis::{Analysis, AnalysisCache, MAX_CACHED_LEN, MAX_SHAPES, analyze_uncached};
pub use classify::{Classification, MAX_SQL_LEN, StatementClass, StatementInfo, classify};
pub use redact::{redact_for_log, redact_literals};

/// Which SQL grammar to parse with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Postgres,
    MySql,
}

impl Dialect {
    pub(crate) fn parser_dialect(self) -> &'static dyn sqlparser::dialect::Dialect {
        match self {
            Dialect::Postgres => &sqlparser::dialect::PostgreSqlDialect {},
            Dialect::MySql => &sqlparser::dialect::MySqlDialect {},
        }
    }
}

/// Why SQL text could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("SQL text is {len} bytes, over the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error("SQL text does not parse: {source}")]
    Parse {
        #[source]
        source: sqlparser::parser::ParserError,
    },
}
