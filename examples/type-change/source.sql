CREATE TABLE public.products (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    price integer NOT NULL -- cents
);
INSERT INTO public.products (name, price)
SELECT 'Product ' || i, (i * 37) % 100000 FROM generate_series(1, 5000) AS i;
