-- Source server db-a: tenants 001 and 002 in the old schema.
CREATE DATABASE tenant_001;
CREATE DATABASE tenant_002;
\c tenant_001
\i /docker-entrypoint-initdb.d/users-old.sql.inc
\c tenant_002
\i /docker-entrypoint-initdb.d/users-old.sql.inc
