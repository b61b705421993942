CREATE TABLE public.posts (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    body text,
    published_at timestamptz
);
