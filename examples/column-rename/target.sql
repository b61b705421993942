CREATE TABLE public.profiles (
    id bigserial PRIMARY KEY,
    display_name text NOT NULL,
    email text NOT NULL UNIQUE
);
