-- source
SELECT id, title, body, published_at FROM public.blog_posts ORDER BY id;
-- target
SELECT id, title, body, published_at FROM public.posts ORDER BY id;
