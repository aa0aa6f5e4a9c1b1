"""The `upcycle introvert cluster` step: embed whole documents, fit K centroids, label every document.

- `clusters`   the Clusters type: k-means fit (FAISS, optionally balanced), save and load
- `corpus`     the step itself: embed a corpus, fit on the training split, label all splits, write the run
- `summary`    what each cluster is about: size, distinctive terms (c-TF-IDF), documents nearest the centroid
"""
