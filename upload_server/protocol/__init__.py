"""Wire formats parsed without any web framework: multipart bodies, tus headers, byte ranges."""
