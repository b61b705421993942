-- The users scenario's source table (example); load your rows after.
CREATE TABLE public.users (
    id BIGSERIAL PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    full_name TEXT NOT NULL,
    bio TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- A few thousand rows so the compose fleet has something to move.
INSERT INTO public.users (email, full_name, bio)
SELECT 'user' || i || '@example.com', (ARRAY['Ada Lovelace','Grace Brewster Murray Hopper','Cher','  Alan  Turing '])[1 + i % 4], repeat('bio ', i % 50)
FROM generate_series(1, 5000) AS i;
