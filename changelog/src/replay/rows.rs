//! Rows of the PostgreSQL change log and the text COPY format of the staging tables.

use schemashift_common::change::{Change, Op};
use schemashift_common::ids::{ChangeSeq, Lsn};

/// COPY text format escaping of one value.
pub(super) fn escape_copy_text(s: &str, out: &mut String) {
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

pub(super) fn row_to_change(r: &tokio_postgres::Row) -> Result<(ChangeSeq, Change), String> {
    let seq: i64 = r.get(0);
    let table: i32 = r.get(1);
    let op: i8 = r.get(2);
    let lsn: String = r.get(3);
    let old_key: Option<Vec<String>> = r.get(4);
    let vals: Option<Vec<Option<String>>> = r.get(5);
    let unchanged: Option<Vec<i16>> = r.get(6);
    let ordinal: i32 = r.get(7);
    Ok((
        ChangeSeq(seq),
        Change {
            table: table as u32,
            op: Op::from_code(op).ok_or_else(|| format!("change {seq} has unknown op {op}"))?,
            lsn: lsn.parse::<Lsn>().map_err(|e| e.to_string())?,
            xid: 0,
            ordinal: ordinal.max(0) as u32,
            old_key,
            values: vals.unwrap_or_default(),
            unchanged: unchanged
                .unwrap_or_default()
                .into_iter()
                .map(|i| i as u16)
                .collect(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_separators() {
        let mut s = String::new();
        escape_copy_text("a\tb\\c\nd", &mut s);
        assert_eq!(s, "a\\tb\\\\c\\nd");
    }
}
