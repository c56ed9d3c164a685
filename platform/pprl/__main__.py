from pprl.cli import main

main()
