CREATE TABLE public.products (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    price numeric(10,2) NOT NULL -- dollars
);
