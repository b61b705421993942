CREATE TABLE public.blog_posts (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    body text,
    published_at timestamptz
);
INSERT INTO public.blog_posts (title, body, published_at)
SELECT 'Post ' || i, repeat('Lorem ipsum ', i % 300), CASE WHEN i % 4 = 0 THEN NULL ELSE now() - i * interval '1 hour' END
FROM generate_series(1, 5000) AS i;
