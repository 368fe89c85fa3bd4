from hnclip.rehearsal.run import main

main()
