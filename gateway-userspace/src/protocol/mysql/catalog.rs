//! Views and stored routines of the server, for masking by lineage (pure).
//!
//! The proxy reads `information_schema.VIEWS` and `ROUTINES` once per
//! connection (when the resource has column rules) and keeps them here: a
//! view's columns resolve to its definition's lineage, so `SELECT
//! REVERSE(ssn) FROM v` is masked like the same read of the table; a call of
//! a function defined in the database makes a result's computed columns of
//! unknown origin (it may read any table unseen). Fails closed: a view whose
//! definition cannot be read or analysed is protected wholesale, and so is
//! every relation when the catalog could not be read at all.

use std::collections::{HashMap, HashSet};

use crate::{
    mask::lineage::{RelationKind, Relations, is_data_catalog},
    sql::{
        Dialect,
        lineage::{Lineage, Output, Outputs, lineage},
    },
};

/// Most rows the catalog queries may return (views plus routines).
pub const MAX_CATALOG_ROWS: usize = 10_000;

/// The query for views: schema, name, definition.
pub const VIEWS_SQL: &str = "SELECT TABLE_SCHEMA, TABLE_NAME, VIEW_DEFINITION FROM information_schema.VIEWS WHERE TABLE_SCHEMA NOT IN ('sys', 'mysql', 'information_schema', 'performance_schema')";
/// The query for stored routines: schema, name.
pub const ROUTINES_SQL: &str = "SELECT ROUTINE_SCHEMA, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA NOT IN ('sys', 'mysql')";

/// What the server's catalog says about names in statements.
#[derive(Debug, Default)]
pub struct Catalog {
    /// By lower-cased view name (unqualified and `schema.name`): its
    /// columns' lineage, `None` when not analysable.
    views: HashMap<String, Option<Vec<(String, Lineage)>>>,
    /// Lower-cased routine names, unqualified and `schema.name`.
    functions: HashSet<String>,
    /// The catalog could not be read: every relation is protected wholesale.
    unavailable: bool,
}

impl Catalog {
    /// A catalog that could not be read.
    pub fn unavailable() -> Self {
        Self {
            unavailable: true,
            ..Self::default()
        }
    }

    /// From the rows of [`VIEWS_SQL`] and [`ROUTINES_SQL`].
    pub fn from_rows(views: &[Vec<Option<String>>], routines: &[Vec<Option<String>>]) -> Self {
        let mut c = Self::default();
        for r in views {
            let (Some(Some(schema)), Some(Some(name))) = (r.first(), r.get(1)) else {
                continue;
            };
            let def = r
                .get(2)
                .and_then(Option::as_deref)
                .filter(|d| !d.is_empty())
                .and_then(view_columns);
            c.views
                .insert(format!("{schema}.{name}").to_lowercase(), def.clone());
            c.views.insert(name.to_lowercase(), def);
        }
        for r in routines {
            if let (Some(Some(schema)), Some(Some(name))) = (r.first(), r.get(1)) {
                c.functions
                    .insert(format!("{schema}.{name}").to_lowercase());
                c.functions.insert(name.to_lowercase());
            }
        }
        c
    }

    pub fn is_view(&self, relation: &str) -> bool {
        self.unavailable || self.views.contains_key(&relation.to_lowercase())
    }
}

/// A view definition's output columns (`MySQL` renders it fully qualified,
/// with backticks).
fn view_columns(definition: &str) -> Option<Vec<(String, Lineage)>> {
    let all = lineage(definition, Dialect::MySql)?;
    let [one] = all.as_slice() else { return None };
    let Outputs::Known(outputs) = &one.outputs else {
        return None;
    };
    outputs
        .iter()
        .map(|o| match o {
            Output::Column { name, lineage } => Some((name.clone(), lineage.clone())),
            Output::Star { .. } => None,
        })
        .collect()
}

impl Relations for Catalog {
    fn kind(&self, relation: &str) -> RelationKind<'_> {
        if is_data_catalog(relation) {
            return RelationKind::DataCatalog;
        }
        if self.unavailable {
            return RelationKind::View(None);
        }
        match self.views.get(&relation.to_lowercase()) {
            Some(def) => RelationKind::View(def.as_deref()),
            None => RelationKind::Table,
        }
    }

    fn is_user_function(&self, name: &str) -> bool {
        self.unavailable || self.functions.contains(&name.to_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_resolve_to_their_definition_and_routines_are_known() {
        let views = vec![vec![
            Some("shop".into()),
            Some("v".into()),
            Some("select `shop`.`customers`.`id` AS `id`,`shop`.`customers`.`ssn` AS `ssn` from `shop`.`customers`".into()),
        ]];
        let routines = vec![vec![Some("shop".into()), Some("Leak".into())]];
        let c = Catalog::from_rows(&views, &routines);
        match c.kind("v") {
            RelationKind::View(Some(cols)) => {
                assert_eq!(cols.len(), 2);
                assert_eq!(cols[1].0, "ssn");
            }
            _ => panic!("v is a view with a definition"),
        }
        assert!(matches!(c.kind("shop.V"), RelationKind::View(Some(_))));
        assert!(matches!(c.kind("customers"), RelationKind::Table));
        assert!(c.is_user_function("leak") && c.is_user_function("shop.leak"));
        assert!(!c.is_user_function("reverse"));
        let none = Catalog::unavailable();
        assert!(matches!(none.kind("customers"), RelationKind::View(None)));
    }
}
