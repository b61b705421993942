CREATE TABLE public.users (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    theme text NOT NULL DEFAULT 'light',
    locale text
);
