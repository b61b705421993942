UPDATE public.blog_posts SET published_at = now() WHERE published_at IS NULL AND id % 8 = 0;
UPDATE public.blog_posts SET title = title || ' (updated)' WHERE id % 11 = 0;
DELETE FROM public.blog_posts WHERE id % 19 = 0;
INSERT INTO public.blog_posts (title, body) VALUES ('Draft', NULL);
