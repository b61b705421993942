-- Target server db-x: every tenant's new schema, empty.
CREATE DATABASE tenant_001;
CREATE DATABASE tenant_002;
CREATE DATABASE tenant_003;
CREATE DATABASE tenant_004;
\c tenant_001
\i /docker-entrypoint-initdb.d/users-new.sql.inc
\c tenant_002
\i /docker-entrypoint-initdb.d/users-new.sql.inc
\c tenant_003
\i /docker-entrypoint-initdb.d/users-new.sql.inc
\c tenant_004
\i /docker-entrypoint-initdb.d/users-new.sql.inc
