"""Pictures a person looks at: slide thumbnails with tissue and patch grid."""
