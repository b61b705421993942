CREATE TABLE public.profiles (
    id bigserial PRIMARY KEY,
    full_name text NOT NULL,
    email text NOT NULL UNIQUE
);
INSERT INTO public.profiles (full_name, email)
SELECT 'Person ' || i, 'p' || i || '@example.com' FROM generate_series(1, 5000) AS i;
