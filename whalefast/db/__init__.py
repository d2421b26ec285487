"""The db layer: the catalogue database (SQLite): individuals, photos and sightings, embeddings per model, review decisions, history. It imports only core."""
