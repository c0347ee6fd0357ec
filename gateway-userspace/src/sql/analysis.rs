//! Classification and redaction once per statement *shape*.
//!
//! Agents and drivers send the same statements with different literals
//! (`... WHERE id = 41`, `... WHERE id = 42`). The shape is the token sequence
//! with every literal replaced by a marker: it takes one tokenizer pass, about
//! a fifth of what parsing, classifying and redacting cost. Statements of one
//! shape differ only in literal values, which neither the class, the tables
//! and functions, nor the literal-free rendering depend on, so the first
//! statement's [`Analysis`] serves the rest.
//!
//! Not cached: text over [`MAX_CACHED_LEN`] bytes, text that does not
//! tokenize, and text that does not parse (its reason is per statement). The
//! cache holds at most [`MAX_SHAPES`] shapes and is emptied when full.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
};

use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use super::{
    Classification, Dialect, classify, lineage::StatementLineage, redact::is_literal,
    redact_for_log,
};

/// Longest statement whose analysis is cached.
pub const MAX_CACHED_LEN: usize = 2048;
/// Most shapes held (each at most a few KiB).
pub const MAX_SHAPES: usize = 2048;

/// What the proxy needs to decide on and record a statement.
#[derive(Debug)]
pub struct Analysis {
    pub classification: Arc<Classification>,
    /// Literal-free rendering for records ([`redact_for_log`]).
    pub redacted: String,
    /// Column lineage per statement ([`super::lineage`]); `None` when the
    /// text does not parse.
    pub lineage: Option<Vec<StatementLineage>>,
}

/// Shared by all connections of a daemon.
#[derive(Default)]
pub struct AnalysisCache {
    shapes: Mutex<HashMap<(Dialect, String), Arc<Analysis>>>,
}

impl AnalysisCache {
    /// The statement's analysis, from the cache when its shape was seen.
    pub fn analyze(&self, sql: &str, dialect: Dialect) -> Arc<Analysis> {
        // MySQL's executable comments are code: the shape (which drops
        // comments) must see them as such.
        let unwrapped = match dialect {
            Dialect::MySql => super::mysql::unwrap_executable_comments(sql),
            Dialect::Postgres => std::borrow::Cow::Borrowed(sql),
        };
        let sql = &*unwrapped;
        let Some(shape) = shape(sql, dialect) else {
            return Arc::new(analyze_uncached(sql, dialect));
        };
        let key = (dialect, shape);
        if let Some(a) = self.lock().get(&key) {
            return Arc::clone(a);
        }
        let a = Arc::new(analyze_uncached(sql, dialect));
        if a.classification.reason.is_none() {
            let mut shapes = self.lock();
            if shapes.len() >= MAX_SHAPES {
                shapes.clear();
            }
            shapes.insert(key, Arc::clone(&a));
        }
        a
    }

    /// Shapes held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Dialect, String), Arc<Analysis>>> {
        // The map is valid between any two statements; a panic elsewhere
        // cannot leave it half-updated.
        self.shapes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Parse, classify and redact, without the cache.
pub fn analyze_uncached(sql: &str, dialect: Dialect) -> Analysis {
    if dialect == Dialect::MySql {
        let sql = super::mysql::unwrap_executable_comments(sql);
        if let Some(segments) = super::mysql::preclassify(&sql, 0) {
            // Statements the parser does not model: no lineage (their
            // results, if any, are masked as of unknown origin), unless
            // they only describe the schema.
            let lineage = super::mysql::only_schema_descriptions(&segments).then(|| {
                segments
                    .iter()
                    .map(|_| super::lineage::StatementLineage {
                        outputs: super::lineage::Outputs::Known(Vec::new()),
                        predicates: Vec::new(),
                        writes: Vec::new(),
                        functions: Vec::new(),
                        cursor: None,
                        fetch: None,
                    })
                    .collect()
            });
            return Analysis {
                classification: Arc::new(classify(&sql, dialect)),
                redacted: redact_for_log(&sql, dialect),
                lineage,
            };
        }
        return analyze_parsed(&sql, dialect);
    }
    analyze_parsed(sql, dialect)
}

fn analyze_parsed(sql: &str, dialect: Dialect) -> Analysis {
    // One parse for both; text that does not parse is classified on its
    // own terms (cursor moves, the reason) and has no lineage.
    let parsed = (sql.len() <= super::MAX_SQL_LEN)
        .then(|| {
            sqlparser::parser::Parser::new(dialect.parser_dialect())
                .with_recursion_limit(super::classify::PARSER_RECURSION_LIMIT)
                .try_with_sql(sql)
                .and_then(|mut p| p.parse_statements())
                .ok()
        })
        .flatten();
    let (classification, lineage) = match parsed {
        Some(statements) => (
            super::classify::classify_parsed(&statements),
            Some(super::lineage::of_statements(&statements)),
        ),
        None => (classify(sql, dialect), None),
    };
    Analysis {
        classification: Arc::new(classification),
        redacted: redact_for_log(sql, dialect),
        lineage,
    }
}

/// The token sequence with literals as `?`, tokens separated by `\u{1}`
/// (which no token contains) and comments and whitespace dropped. `None`:
/// too long, or does not tokenize.
fn shape(sql: &str, dialect: Dialect) -> Option<String> {
    if sql.len() > MAX_CACHED_LEN {
        return None;
    }
    let tokens = Tokenizer::new(dialect.parser_dialect(), sql)
        .tokenize()
        .ok()?;
    let mut out = String::with_capacity(sql.len() + tokens.len());
    for tok in &tokens {
        match tok {
            Token::Whitespace(
                Whitespace::Space
                | Whitespace::Tab
                | Whitespace::Newline
                | Whitespace::SingleLineComment { .. }
                | Whitespace::MultiLineComment(_),
            ) => continue,
            t if is_literal(t, dialect) => out.push('?'),
            t => {
                let _ = write!(out, "{t}");
            }
        }
        out.push('\u{1}');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::StatementClass;

    #[test]
    fn statements_differing_only_in_literals_share_one_analysis() {
        let c = AnalysisCache::default();
        let a = c.analyze(
            "SELECT name FROM customers WHERE id = 41",
            Dialect::Postgres,
        );
        let b = c.analyze(
            "SELECT  name FROM customers /* x */ WHERE id = 42",
            Dialect::Postgres,
        );
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(c.len(), 1);
        assert_eq!(a.redacted, "SELECT name FROM customers WHERE id = ?");
    }

    #[test]
    fn any_other_token_is_another_shape() {
        let c = AnalysisCache::default();
        let read = c.analyze("SELECT * FROM t WHERE id = 1", Dialect::Postgres);
        for other in [
            "SELECT * FROM u WHERE id = 1",
            "SELECT * FROM t WHERE id = 1 FOR UPDATE",
            "SELECT * FROM \"t\" WHERE id = 1",
            "SELECT * FROM t WHERE id = 1; DELETE FROM t",
            "SELECT pg_read_file('x')",
            "COPY t TO '/tmp/x'",
        ] {
            let a = c.analyze(other, Dialect::Postgres);
            assert!(!Arc::ptr_eq(&read, &a), "{other}");
            assert_eq!(
                a.classification.class,
                classify(other, Dialect::Postgres).class,
                "{other}"
            );
        }
        assert_eq!(
            c.analyze(
                "SELECT * FROM t WHERE id = 1; DELETE FROM t",
                Dialect::Postgres
            )
            .classification
            .class,
            StatementClass::Write
        );
    }

    #[test]
    fn unparsed_long_and_untokenizable_text_is_not_cached() {
        let c = AnalysisCache::default();
        let bad = c.analyze("SELECT * FROM t WHERE a = 'x' 'y'", Dialect::Postgres);
        assert_eq!(bad.classification.class, StatementClass::Unknown);
        let long = format!("SELECT {} FROM t", "1, ".repeat(MAX_CACHED_LEN));
        c.analyze(&long, Dialect::Postgres);
        let torn = c.analyze("SELECT 'unterminated", Dialect::Postgres);
        assert_eq!(torn.classification.class, StatementClass::Unknown);
        assert!(c.is_empty());
    }

    /// The cache's premise, checked on the classification corpus: replacing
    /// the contents of every literal (with digits, SQL keywords, `;`, `--`,
    /// ...) keeps the shape, and then also the class, tables, functions,
    /// destructiveness and the redacted text.
    mod literal_contents_never_matter {
        use proptest::prelude::*;

        use super::super::*;

        fn corpus() -> Vec<String> {
            include_str!("../../tests/fixtures/sql_corpus.tsv")
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(|l| {
                    let mut p = l.splitn(3, '\t');
                    let (_, dialect, sql) = (p.next()?, p.next()?, p.next()?);
                    (dialect == "pg").then(|| sql.replace("\\n", "\n").replace("\\t", "\t"))
                })
                .collect()
        }

        /// Renders the tokens with each literal's contents replaced.
        fn mutate(sql: &str, words: &[&str], seed: usize) -> Option<String> {
            let tokens = Tokenizer::new(Dialect::Postgres.parser_dialect(), sql)
                .tokenize()
                .ok()?;
            let mut out = String::new();
            for (i, t) in tokens.iter().enumerate() {
                let pick = words[(seed + i * 7) % words.len()];
                match t {
                    Token::Number(..) => out.push_str(&(seed * 31 + i).to_string()),
                    Token::SingleQuotedString(_) => {
                        out.push('\'');
                        out.push_str(pick);
                        out.push('\'');
                    }
                    t if is_literal(t, Dialect::Postgres) => return None,
                    t => {
                        let _ = write!(out, "{t}");
                    }
                }
            }
            Some(out)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn holds(index in 0usize..10_000, seed in 0usize..1_000_000) {
                const WORDS: &[&str] = &[
                    "x", "", "123-45-6789", "; DELETE FROM t; --", "DROP TABLE t",
                    "/* c */", "$$", "SELECT pg_read_file(1)", "COPY t TO PROGRAM", "e\\x",
                ];
                let corpus = corpus();
                let sql = &corpus[index % corpus.len()];
                let Some(other) = mutate(sql, WORDS, seed) else { return Ok(()) };
                let (Some(a), Some(b)) = (shape(sql, Dialect::Postgres), shape(&other, Dialect::Postgres)) else {
                    return Ok(());
                };
                prop_assert_eq!(&a, &b, "{} / {}", sql, other);
                let (x, y) = (analyze_uncached(sql, Dialect::Postgres), analyze_uncached(&other, Dialect::Postgres));
                if x.classification.reason.is_some() {
                    return Ok(()); // never cached
                }
                prop_assert_eq!(x.classification.class, y.classification.class, "{} / {}", sql, other);
                prop_assert_eq!(&x.classification.tables, &y.classification.tables);
                prop_assert_eq!(&x.classification.functions, &y.classification.functions);
                prop_assert_eq!(x.classification.destructive, y.classification.destructive);
                prop_assert_eq!(&x.redacted, &y.redacted, "{} / {}", sql, other);
            }
        }
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = AnalysisCache::default();
        for i in 0..=MAX_SHAPES {
            c.analyze(&format!("SELECT c{i} FROM t"), Dialect::Postgres);
        }
        assert!(c.len() <= MAX_SHAPES);
    }
}
