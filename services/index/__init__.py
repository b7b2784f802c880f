"""The image index of a model: embeddings, cluster assignments and thumbnails of the images it has embedded,
with nearest-neighbour search (faiss), so people can see what a cluster is and find similar images."""
