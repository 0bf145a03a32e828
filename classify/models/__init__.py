"""Models, built by name (`nets.create_model`), and their pretrained weights."""
