-- The users scenario's target table (example).
CREATE TABLE public.users (
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
CREATE INDEX users_first_name_last_name_idx ON public.users (first_name, last_name);
