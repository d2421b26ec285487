"""The db layer: the catalogue database (SQLite): individuals, photos and sightings, embeddings per model, review decisions, history. It imports only core."""

CATALOGUE_DB = "catalogue.db"  # the catalogue database's name in a models folder, beside the run folders that share it
