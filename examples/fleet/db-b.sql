-- Source server db-b: tenants 003 and 004 in the old schema.
CREATE DATABASE tenant_003;
CREATE DATABASE tenant_004;
\c tenant_003
\i /docker-entrypoint-initdb.d/users-old.sql.inc
\c tenant_004
\i /docker-entrypoint-initdb.d/users-old.sql.inc
