"""Batch scoring for `predict`: chunks of files through the logged pyfunc, in this process (`local`)
or in Spark's Python workers (`spark`, whose workers fork from `spark_daemon`)."""
