"""The build pipeline: count a corpus (`count`), size the plan (`sizing`), build the store (`build`), on any executor."""
