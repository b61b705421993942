//! All SQL text schemashift builds: identifier and literal quoting, the spec's helper
//! functions rewritten into `pg_temp`, mapping expressions with qualified helper calls,
//! and key-range predicates. Identifiers from users are always quoted here.

use serde::{Deserialize, Serialize};
use sqlparser::ast::{Expr, Ident, ObjectName, ObjectNamePart, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::ControlFlow;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SqlError {
    #[error("{0:?} is not a table name (expected schema.table or table)")]
    BadName(String),
    #[error("cannot parse expression {expr:?}: {reason}")]
    BadExpression { expr: String, reason: String },
    #[error("cannot parse helper function: {0}")]
    BadFunction(String),
}

/// Always quotes, so reserved words, capitals and hostile names are all safe.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal for sessions with `standard_conforming_strings = on` (we set it).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Session settings every schemashift connection uses, so text forms of values
/// (checksums, replayed text) are identical on both sides.
pub const SESSION_SETUP: &str = "SET standard_conforming_strings = on; SET TimeZone = 'UTC'; \
     SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; \
     SET bytea_output = 'hex'; SET application_name = 'schemashift'";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

fn ident_value(id: &Ident) -> String {
    // Unquoted identifiers fold to lower case, as PostgreSQL does.
    match id.quote_style {
        Some(_) => id.value.clone(),
        None => id.value.to_lowercase(),
    }
}

impl QualifiedName {
    pub fn parse(s: &str) -> Result<Self, SqlError> {
        let bad = || SqlError::BadName(s.to_owned());
        let mut parser = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(s)
            .map_err(|_| bad())?;
        let name = parser.parse_object_name(false).map_err(|_| bad())?;
        if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
            return Err(bad());
        }
        let parts: Vec<String> = name
            .0
            .iter()
            .map(|p| p.as_ident().map(ident_value).ok_or_else(bad))
            .collect::<Result<_, _>>()?;
        match parts.as_slice() {
            [t] => Ok(QualifiedName {
                schema: "public".into(),
                name: t.clone(),
            }),
            [s, t] => Ok(QualifiedName {
                schema: s.clone(),
                name: t.clone(),
            }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for QualifiedName {
    /// The quoted SQL form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.name)
        )
    }
}

/// One of the spec's helper functions, rewritten to be created in `pg_temp`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Helper {
    /// Lower-cased name as calls refer to it.
    pub name: String,
    /// The `CREATE FUNCTION pg_temp.name ...` statement.
    pub create_sql: String,
}

impl Helper {
    /// Parses a `CREATE FUNCTION` with a real SQL parser and splices `pg_temp.` before
    /// its name at the position the parser reports (the body is left byte for byte).
    pub fn parse(def: &str) -> Result<Helper, SqlError> {
        let stmts = Parser::parse_sql(&PostgreSqlDialect {}, def)
            .map_err(|e| SqlError::BadFunction(e.to_string()))?;
        let [Statement::CreateFunction(cf)] = stmts.as_slice() else {
            return Err(SqlError::BadFunction(
                "each entry of `functions` must be exactly one CREATE FUNCTION statement".into(),
            ));
        };
        let parts: Vec<&Ident> = cf.name.0.iter().filter_map(|p| p.as_ident()).collect();
        let [ident] = parts.as_slice() else {
            return Err(SqlError::BadFunction(format!(
                "function {} must not name a schema: it is created in pg_temp",
                cf.name
            )));
        };
        let offset = offset_of(def, ident.span.start.line, ident.span.start.column)
            .ok_or_else(|| SqlError::BadFunction(format!("cannot locate name of {}", cf.name)))?;
        let mut create_sql = String::with_capacity(def.len() + 8);
        create_sql.push_str(&def[..offset]);
        create_sql.push_str("pg_temp.");
        create_sql.push_str(&def[offset..]);
        Ok(Helper {
            name: ident_value(ident),
            create_sql,
        })
    }
}

/// Byte offset of a 1-based (line, column-in-chars) position.
fn offset_of(text: &str, line: u64, column: u64) -> Option<usize> {
    let mut cur_line = 1u64;
    let mut line_start = 0usize;
    if line > 1 {
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                cur_line += 1;
                if cur_line == line {
                    line_start = i + 1;
                    break;
                }
            }
        }
        if cur_line != line {
            return None;
        }
    }
    let rest = &text[line_start..];
    let col = usize::try_from(column.checked_sub(1)?).ok()?;
    rest.char_indices()
        .nth(col)
        .map(|(i, _)| line_start + i)
        .or_else(|| (rest.chars().count() == col).then_some(text.len()))
}

/// A mapping expression, parsed, with helper calls qualified as `pg_temp.name(...)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedExpr {
    /// SQL to evaluate over a row of the source table.
    pub sql: String,
    /// Source columns it references (to know what an UPDATE without a TOASTed value can set).
    pub deps: BTreeSet<String>,
    /// The source column it copies as is, when it is a bare column reference.
    pub bare_column: Option<String>,
}

impl MappedExpr {
    pub fn parse(
        expr: &str,
        helpers: &[Helper],
        source_columns: &[String],
    ) -> Result<Self, SqlError> {
        let bad = |reason: String| SqlError::BadExpression {
            expr: expr.to_owned(),
            reason,
        };
        let mut parser = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(expr)
            .map_err(|e| bad(e.to_string()))?;
        let mut ast = parser.parse_expr().map_err(|e| bad(e.to_string()))?;
        if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
            return Err(bad("unexpected text after the expression".into()));
        }
        let bare_column = match &ast {
            Expr::Identifier(id) => Some(ident_value(id)),
            _ => None,
        };
        let mut deps = BTreeSet::new();
        let _ = sqlparser::ast::visit_expressions_mut(&mut ast, |e| {
            match e {
                Expr::Identifier(id) => {
                    let v = ident_value(id);
                    if source_columns.contains(&v) {
                        deps.insert(v);
                    }
                }
                Expr::CompoundIdentifier(ids) => {
                    if let Some(v) = ids.last().map(ident_value) {
                        if source_columns.contains(&v) {
                            deps.insert(v);
                        }
                    }
                }
                Expr::Function(f) => {
                    if let [ObjectNamePart::Identifier(id)] = f.name.0.as_slice() {
                        let v = ident_value(id);
                        if helpers.iter().any(|h| h.name == v) {
                            f.name = ObjectName(vec![
                                ObjectNamePart::Identifier(Ident::new("pg_temp")),
                                ObjectNamePart::Identifier(id.clone()),
                            ]);
                        }
                    }
                }
                _ => {}
            }
            ControlFlow::<()>::Continue(())
        });
        Ok(MappedExpr {
            sql: ast.to_string(),
            deps,
            bare_column,
        })
    }
}

/// A key column with its SQL type, for range predicates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCol {
    pub name: String,
    pub sql_type: String,
}

impl KeyCol {
    /// Text keys compare byte-wise (`COLLATE "C"`) so both clusters agree on the order.
    pub fn order_expr(&self) -> String {
        if is_collatable(&self.sql_type) {
            format!("{} COLLATE \"C\"", quote_ident(&self.name))
        } else {
            quote_ident(&self.name)
        }
    }
    pub fn literal(&self, value: &str) -> String {
        format!("{}::{}", quote_literal(value), self.sql_type)
    }
}

fn is_collatable(sql_type: &str) -> bool {
    let t = sql_type.to_ascii_lowercase();
    t == "text"
        || t.starts_with("character")
        || t.starts_with("varchar")
        || t == "citext"
        || t == "name"
}

/// `ORDER BY` list of a key.
pub fn key_order(key: &[KeyCol]) -> String {
    key.iter()
        .map(KeyCol::order_expr)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Key tuple as text, one column each: `"id"::text AS __k0, ...`. The alias matters:
/// without it `ORDER BY "id"` would sort by the text output column, not the key.
pub fn key_text_select(key: &[KeyCol]) -> String {
    key.iter()
        .enumerate()
        .map(|(i, k)| format!("{}::text AS __k{i}", quote_ident(&k.name)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn tuple(key: &[KeyCol], bound: &[String]) -> (String, String) {
    if key.len() == 1 {
        (key[0].order_expr(), key[0].literal(&bound[0]))
    } else {
        let cols = key
            .iter()
            .map(KeyCol::order_expr)
            .collect::<Vec<_>>()
            .join(", ");
        let vals = key
            .iter()
            .zip(bound)
            .map(|(k, v)| k.literal(v))
            .collect::<Vec<_>>()
            .join(", ");
        (format!("ROW({cols})"), format!("ROW({vals})"))
    }
}

/// `lo <= key < hi`, either end open when `None`. Always a valid predicate.
pub fn range_predicate(key: &[KeyCol], lo: Option<&[String]>, hi: Option<&[String]>) -> String {
    let mut parts = Vec::new();
    if let Some(lo) = lo {
        let (k, v) = tuple(key, lo);
        parts.push(format!("{k} >= {v}"));
    }
    if let Some(hi) = hi {
        let (k, v) = tuple(key, hi);
        parts.push(format!("{k} < {v}"));
    }
    if parts.is_empty() {
        "true".into()
    } else {
        parts.join(" AND ")
    }
}

/// `key IN (tuple, ...)` for a list of key tuples (text values), in the same
/// comparison form as [`range_predicate`].
pub fn keys_in(key: &[KeyCol], keys: &[Vec<String>]) -> String {
    let Some(first) = keys.first() else {
        return "false".into();
    };
    let cols = tuple(key, first).0;
    let vals: Vec<String> = keys.iter().map(|k| tuple(key, k).1).collect();
    format!("{cols} IN ({})", vals.join(", "))
}

pub fn ident_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helpers() -> Vec<Helper> {
        vec![Helper::parse(
            "CREATE FUNCTION split_first(n text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT split_part(n, ' ', 1) $$",
        )
        .expect("helper parses")]
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("o'neil"), "'o''neil'");
        let q = QualifiedName::parse("Public.\"MyTable\"").expect("name");
        assert_eq!(q.to_string(), "\"public\".\"MyTable\"");
        assert_eq!(
            QualifiedName::parse("users").expect("name").schema,
            "public"
        );
        assert!(QualifiedName::parse("a.b.c").is_err());
        assert!(QualifiedName::parse("users; drop table x").is_err());
    }

    #[test]
    fn helper_is_created_in_pg_temp_with_its_body_untouched() {
        let h = &helpers()[0];
        assert_eq!(h.name, "split_first");
        assert!(h
            .create_sql
            .starts_with("CREATE FUNCTION pg_temp.split_first(n text)"));
        assert!(h.create_sql.ends_with("$$ SELECT split_part(n, ' ', 1) $$"));
        let multi = Helper::parse("\n  CREATE OR REPLACE FUNCTION\n   Last_Word(n text) RETURNS text\n LANGUAGE sql AS $$ SELECT 'é' $$").expect("parses");
        assert_eq!(multi.name, "last_word");
        assert!(
            multi.create_sql.contains("pg_temp.Last_Word(n text)"),
            "{}",
            multi.create_sql
        );
        assert!(Helper::parse("SELECT 1").is_err());
        assert!(
            Helper::parse("CREATE FUNCTION s.f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$")
                .is_err()
        );
    }

    #[test]
    fn helper_calls_are_qualified_and_deps_found() {
        let cols: Vec<String> = ["id", "full_name", "price"].map(String::from).to_vec();
        let e = MappedExpr::parse("split_first(full_name)", &helpers(), &cols).expect("expr");
        assert_eq!(e.sql, "pg_temp.split_first(full_name)");
        assert_eq!(e.deps.iter().collect::<Vec<_>>(), ["full_name"]);
        let e = MappedExpr::parse("upper(Split_First(trim(full_name)))", &helpers(), &cols)
            .expect("expr");
        assert_eq!(e.sql, "upper(pg_temp.Split_First(TRIM(full_name)))");
        let e = MappedExpr::parse("price::numeric / 100", &helpers(), &cols).expect("expr");
        assert_eq!(e.deps.iter().collect::<Vec<_>>(), ["price"]);
        assert_eq!(e.bare_column, None);
        let e = MappedExpr::parse("ID", &helpers(), &cols).expect("expr");
        assert_eq!(e.bare_column.as_deref(), Some("id"));
        assert!(MappedExpr::parse("split_first(full_name", &helpers(), &cols).is_err());
        assert!(MappedExpr::parse("id; DROP TABLE users", &helpers(), &cols).is_err());
    }

    #[test]
    fn key_lists_use_the_range_comparison_form() {
        let k = vec![KeyCol {
            name: "id".into(),
            sql_type: "bigint".into(),
        }];
        assert_eq!(
            keys_in(&k, &[vec!["1".into()], vec!["2".into()]]),
            "\"id\" IN ('1'::bigint, '2'::bigint)"
        );
        assert_eq!(keys_in(&k, &[]), "false");
    }

    #[test]
    fn range_predicates_cover_open_ends_and_composites() {
        let k = vec![KeyCol {
            name: "id".into(),
            sql_type: "bigint".into(),
        }];
        assert_eq!(range_predicate(&k, None, None), "true");
        assert_eq!(
            range_predicate(&k, Some(&["10".into()]), Some(&["20".into()])),
            "\"id\" >= '10'::bigint AND \"id\" < '20'::bigint"
        );
        let c = vec![
            KeyCol {
                name: "org".into(),
                sql_type: "text".into(),
            },
            KeyCol {
                name: "n".into(),
                sql_type: "integer".into(),
            },
        ];
        assert_eq!(
            range_predicate(&c, Some(&["a'b".into(), "3".into()]), None),
            "ROW(\"org\" COLLATE \"C\", \"n\") >= ROW('a''b'::text, '3'::integer)"
        );
    }
}
