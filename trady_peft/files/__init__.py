"""What the adapter file holds.

* `format`: the tensors a TraDy adapter file holds and the checks a load runs on them;
* `source`: which file is being loaded, so that errors name it;
* `atomic`: saves that replace a file only by a complete one;
* `codec`: exact plain-text tensors for the selection state.
"""
