"""Rows and datasets: the example type, dataset loading and splits, embeddings, text and answer scoring."""
