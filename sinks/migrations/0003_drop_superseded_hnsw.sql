-- Since 0002 the vectors that are searched live per version in detection_vectors and
-- deer_centroids, each version with its own partial HNSW indexes. The 0001 indexes cover
-- columns that are now NULL (deer) or a record of the decision (detections) that nothing
-- searches; keeping them only doubled the index maintenance of every batch write.
DROP INDEX IF EXISTS deer_centroid_resnet_hnsw;
DROP INDEX IF EXISTS deer_centroid_effnet_hnsw;
DROP INDEX IF EXISTS detections_embedding_resnet_hnsw;
DROP INDEX IF EXISTS detections_embedding_effnet_hnsw;
