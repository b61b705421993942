//! The brief's `users` scenario: old and new table, the split helpers, a fast data loader and
//! the migration spec that moves one to the other.

use rand::Rng;

/// The old `users` table on the source.
pub const SOURCE_DDL: &str = "CREATE TABLE public.users (
    id BIGSERIAL PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    full_name TEXT NOT NULL,
    bio TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
)";

/// The new `users` table on the target, with its three name indexes.
pub const TARGET_DDL: &str = "CREATE TABLE public.users (
    id BIGSERIAL PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    bio TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX users_first_name_idx ON public.users (first_name);
CREATE INDEX users_last_name_idx ON public.users (last_name);
CREATE INDEX users_first_name_last_name_idx ON public.users (first_name, last_name)";

/// The split rule as SQL helpers: trim spaces, split at the last space, trim the parts; no
/// space gives `(name, '')`, empty (or NULL) gives `('', '')`. Single-expression `sql`
/// functions without FROM so the planner inlines them into the backfill query.
pub const SPLIT_FUNCTIONS: [&str; 3] = [
    // Everything before the last space; without a space `left` keeps the whole string.
    "CREATE FUNCTION split_first(n text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT rtrim(left(btrim(coalesce(n, '')),
                    length(btrim(coalesce(n, ''))) - strpos(reverse(btrim(coalesce(n, ''))), ' ')))
$$",
    // Everything after the last space; without a space the start lies past the end, giving ''.
    "CREATE FUNCTION split_last(n text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT substr(btrim(coalesce(n, '')),
                length(btrim(coalesce(n, ''))) - strpos(reverse(btrim(coalesce(n, ''))), ' ') + 2)
$$",
    // The non-empty parts joined by one space (|| is immutable, concat_ws is only stable).
    "CREATE FUNCTION concat_names(first text, last text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN coalesce(first, '') = '' THEN coalesce(last, '')
              WHEN coalesce(last, '') = '' THEN first
              ELSE first || ' ' || last END
$$",
];

pub const FIRST_NAMES: &[&str] = &[
    "James",
    "Mary",
    "John",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Linda",
    "William",
    "Elizabeth",
    "David",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Christopher",
    "Nancy",
    "Daniel",
    "Lisa",
    "Matthew",
    "Betty",
    "Anthony",
    "Margaret",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
    "Kenneth",
    "Carol",
    "Kevin",
    "Amanda",
    "Brian",
    "Dorothy",
    "George",
    "Melissa",
    "Timothy",
    "Deborah",
    "Aisha",
    "Hiroshi",
    "Priya",
    "Mateo",
    "Ingrid",
    "Olumide",
    "Sofia",
    "Dmitri",
    "Chloé",
    "Björn",
];

pub const LAST_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Okafor",
    "Tanaka",
    "Patel",
    "Kowalski",
    "Müller",
    "Ivanova",
    "O'Brien",
    "Smith-Jones",
    "Nakamura",
    "Lindqvist",
];

/// The 1% of names that break naive splitting.
pub const COMPLEX_NAMES: &[&str] = &[
    "  Anna   Maria  Lopez ",
    "Mary-Jane Watson-Parker",
    "van der Berg, Johann",
    "Dr. John Q. Public III",
    "김철수",
    "Jean-Luc  Picard",
    "  Cher  ",
    "José María García-López",
    "Ludwig van Beethoven",
    "Zoë   Saldaña-Perego ",
    "Jean - Paul Sartre",
    "毛 泽东",
];

const BIO_OPENERS: &[&str] = &[
    "Software engineer based in Berlin.",
    "Coffee enthusiast and occasional marathon runner.",
    "Product designer who loves typography and long walks.",
    "Data scientist. Opinions are my own.",
    "Parent, gardener, amateur astronomer.",
    "Writing about distributed systems and databases.",
    "Former teacher, current student of everything.",
    "Photographer chasing light across three continents.",
];

const BIO_MIDDLES: &[&str] = &[
    "Currently learning Rust and PostgreSQL internals",
    "Building tools that make migrations boring",
    "Reading too many books at once",
    "Trying to keep the houseplants alive",
    "Volunteering at the local food bank on weekends",
    "Collecting vinyl records from the seventies",
];

const BIO_CLOSERS: &[&str] = &[
    "🚀",
    "Say hi!",
    "DMs open.",
    "#postgres",
    "he/him",
    "she/her",
    "",
];

fn sql_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("'{}'", s.replace('\'', "''")))
        .collect();
    format!("(ARRAY[{}]::text[])", quoted.join(","))
}

/// `arr[random element]` for a constant array.
fn pick(items: &[&str]) -> String {
    format!(
        "{}[1 + floor(random() * {})::int]",
        sql_array(items),
        items.len()
    )
}

/// A full name of the scenario's mix as SQL, `r` being a per-row `random()` in the query.
pub fn name_mix_sql() -> String {
    let (first, last, complex) = (pick(FIRST_NAMES), pick(LAST_NAMES), pick(COMPLEX_NAMES));
    format!(
        "CASE WHEN r < 0.85 THEN {first} || ' ' || {last} \
         WHEN r < 0.95 THEN {first} || ' ' || {first} || ' ' || {last} \
         WHEN r < 0.99 THEN {first} ELSE {complex} END"
    )
}

/// One `INSERT ... SELECT` producing rows with ids `$1..=$2`. A subquery computes the random
/// draws once per row (volatile target lists are not flattened by the planner). Large bios are
/// base64 of distinct slices of one random `bytea` made once per statement: md5 per row
/// (OpenSSL setup per call) or character offsets into a long text would dominate the time.
fn insert_sql() -> String {
    format!(
        "INSERT INTO public.users (id, email, full_name, bio, created_at, updated_at)
WITH blob AS MATERIALIZED (
    SELECT decode(string_agg(md5(g || ':' || random()), ''), 'hex') AS b
    FROM generate_series(1, 2048) AS g)
SELECT i,
       'user' || i || '@example.com',
       {name},
       CASE WHEN rb < 0.10 THEN NULL
            WHEN rb < 0.11 THEN md5(i::text) || encode(substring(b FROM 1 + floor(rb * 1e6)::int % 30000
                                                                   FOR 6200 + floor(r * 600)::int), 'base64')
            ELSE {opener} || ' ' || {middle} || ', ' || {middle2} || '. ' || {closer} END,
       c,
       c + (now() - c) * random()
FROM (SELECT i, random() AS r, random() AS rb,
             now() - random() * interval '1826 days' AS c
      FROM generate_series($1::bigint, $2::bigint) AS i) AS s,
     blob",
        name = name_mix_sql(),
        opener = pick(BIO_OPENERS),
        middle = pick(BIO_MIDDLES),
        middle2 = pick(BIO_MIDDLES),
        closer = pick(BIO_CLOSERS),
    )
}

/// Rows per INSERT statement; only sets how often progress is logged.
const LOAD_CHUNK: u64 = 1_000_000;
/// From this many rows on, indexes are dropped for the load and rebuilt after (about 30%
/// faster for 1M rows than maintaining them row by row).
const REBUILD_INDEXES_FROM: u64 = 100_000;

/// Appends `rows` users to `public.users` (ids continue densely after the current maximum),
/// moves the id sequence past them and analyzes the table. Runs in one transaction, so a
/// failure leaves the table as it was.
pub async fn load_users(
    client: &tokio_postgres::Client,
    rows: u64,
) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    if let Err(e) = load_in_transaction(client, rows).await {
        // The error that matters is the load's, not a failed rollback on a broken connection.
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    client.batch_execute("COMMIT").await?;
    client.batch_execute("ANALYZE public.users").await
}

async fn load_in_transaction(
    client: &tokio_postgres::Client,
    rows: u64,
) -> Result<(), tokio_postgres::Error> {
    let max: i64 = client
        .query_one("SELECT coalesce(max(id), 0) FROM public.users", &[])
        .await?
        .get(0);
    let rebuild = if rows >= REBUILD_INDEXES_FROM {
        drop_indexes(client).await?
    } else {
        Vec::new()
    };
    let stmt = client.prepare(&insert_sql()).await?;
    let mut next = max as u64 + 1;
    let end = max as u64 + rows;
    while next <= end {
        let chunk_end = (next + LOAD_CHUNK - 1).min(end);
        client
            .execute(&stmt, &[&(next as i64), &(chunk_end as i64)])
            .await?;
        tracing::debug!(from = next, to = chunk_end, "loaded users");
        next = chunk_end + 1;
    }
    for sql in &rebuild {
        client.batch_execute(sql).await?;
    }
    if !rebuild.is_empty() {
        tracing::debug!(indexes = rebuild.len(), "rebuilt users indexes");
    }
    client
        .batch_execute(
            "SELECT setval(pg_get_serial_sequence('public.users', 'id'),
                           greatest((SELECT max(id) FROM public.users), 1))",
        )
        .await
}

/// Drops the indexes (and the constraints behind them) of `public.users` and returns the
/// statements that recreate them under the same names. Returns nothing, dropping nothing, when
/// another table references users or the replica identity uses an index.
async fn drop_indexes(
    client: &tokio_postgres::Client,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let blocked: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE confrelid = 'public.users'::regclass)
                 OR (SELECT relreplident = 'i' FROM pg_class WHERE oid = 'public.users'::regclass)",
            &[],
        )
        .await?
        .get(0);
    if blocked {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT format('ALTER TABLE public.users DROP CONSTRAINT %I', conname),
                    format('ALTER TABLE public.users ADD CONSTRAINT %I %s', conname,
                           pg_get_constraintdef(oid))
             FROM pg_constraint
             WHERE conrelid = 'public.users'::regclass AND contype IN ('p', 'u', 'x')
             UNION ALL
             SELECT format('DROP INDEX %s', i.indexrelid::regclass), pg_get_indexdef(i.indexrelid)
             FROM pg_index i
             WHERE i.indrelid = 'public.users'::regclass
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
            &[],
        )
        .await?;
    let mut rebuild = Vec::with_capacity(rows.len());
    for row in rows {
        client.batch_execute(row.get::<_, &str>(0)).await?;
        rebuild.push(row.get::<_, String>(1));
    }
    Ok(rebuild)
}

fn choose<'a, R: Rng + ?Sized>(rng: &mut R, items: &[&'a str]) -> &'a str {
    items[rng.gen_range(0..items.len())]
}

/// A full name drawn from the scenario's mix: 85% "First Last", 10% "First Middle Last",
/// 4% single names, 1% complex ones.
pub fn random_full_name<R: Rng + ?Sized>(rng: &mut R) -> String {
    let r: f64 = rng.gen();
    if r < 0.85 {
        format!("{} {}", choose(rng, FIRST_NAMES), choose(rng, LAST_NAMES))
    } else if r < 0.95 {
        format!(
            "{} {} {}",
            choose(rng, FIRST_NAMES),
            choose(rng, FIRST_NAMES),
            choose(rng, LAST_NAMES)
        )
    } else if r < 0.99 {
        choose(rng, FIRST_NAMES).to_string()
    } else {
        choose(rng, COMPLEX_NAMES).to_string()
    }
}

/// A short bio like the loader's.
pub fn random_short_bio<R: Rng + ?Sized>(rng: &mut R) -> String {
    format!(
        "{} {}. {}",
        choose(rng, BIO_OPENERS),
        choose(rng, BIO_MIDDLES),
        choose(rng, BIO_CLOSERS)
    )
}

/// A bio over 8 KB of random alphanumerics: incompressible, so PostgreSQL stores it out of line.
pub fn random_large_bio<R: Rng + ?Sized>(rng: &mut R) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bytes = vec![0u8; rng.gen_range(8_500..9_500)];
    // fill_bytes runs in the (optimized) rand crate; a per-char iterator is slow in debug builds.
    rng.fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
        .collect()
}

/// A YAML scalar: plain when that is unambiguous, else single-quoted.
pub fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    ':' | '/' | '@' | '.' | '_' | '-' | '=' | '&' | '?' | '%' | '+'
                )
        })
        && !s.contains(": ")
        && !s.starts_with(['-', '?', ':', '%', '@']);
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// The migration spec moving the source `users` table to the target one.
pub fn users_spec_yaml(
    source_dsn: &str,
    target_dsn: &str,
    workers: usize,
    shard_rows: Option<u64>,
) -> String {
    let mut y = String::new();
    y.push_str(&format!("source: {}\n", yaml_scalar(source_dsn)));
    y.push_str(&format!("target: {}\n", yaml_scalar(target_dsn)));
    y.push_str(&format!("workers: {workers}\n"));
    y.push_str("functions:\n");
    for f in SPLIT_FUNCTIONS {
        y.push_str("  - |\n");
        for line in f.lines() {
            y.push_str(&format!("    {line}\n"));
        }
    }
    y.push_str("tables:\n");
    y.push_str("  - source: public.users\n");
    y.push_str("    target: public.users\n");
    y.push_str("    key: id\n");
    if let Some(rows) = shard_rows {
        y.push_str(&format!("    shard_rows: {rows}\n"));
    }
    y.push_str(
        "    columns:
      id: id
      email: email
      first_name: split_first(full_name)
      last_name: split_last(full_name)
      bio: bio
      created_at: created_at
      updated_at: updated_at
    reverse:
      full_name: concat_names(first_name, last_name)
",
    );
    y
}

#[cfg(test)]
#[path = "scenario_tests.rs"]
mod tests;
